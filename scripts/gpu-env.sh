# Sourced on a GPU machine, from the repository root: unpacks the binaries scripts/build-cuda.sh
# left in .gpu/bin (xz-compressed to carry them) and puts the CUDA 13 libraries they link
# (runtime, cuBLAS, cuRAND, NVRTC: from a CUDA install or the nvidia-* wheels of a Python
# environment) and the driver's libcuda.so.1 on the library path.
for f in .gpu/bin/*.xz; do
  [ -e "$f" ] || continue
  python3 -c 'import lzma, sys; open(sys.argv[1][:-3], "wb").write(lzma.open(sys.argv[1]).read())' "$f"
  chmod +x "${f%.xz}"
  rm -f "$f"
done
# The driver's own libcuda.so.1 first: CUDA's forward-compatibility copy (cuda/compat) refuses
# to run on a driver it was not made for (CUDA_ERROR_SYSTEM_DRIVER_MISMATCH, seen on a 580).
libs=""
for l in libcuda.so.1 libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
  f="$(find /usr/local/nvidia/ /usr/lib/x86_64-linux-gnu/ /usr/local/cuda*/ /opt/ -name "$l" \
    -not -path '*/compat/*' 2>/dev/null | head -n1)"
  [ -n "$f" ] && case ":$libs:" in *":$(dirname "$f"):"*) ;; *) libs="$libs:$(dirname "$f")" ;; esac
done
export LD_LIBRARY_PATH="${libs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
