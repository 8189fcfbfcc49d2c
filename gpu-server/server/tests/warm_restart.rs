//! The disk tier across a crash, with the real `kvmesh-gpu-server` binary: a server whose
//! device tier spills straight to disk is killed with SIGKILL while it is serving; one slot
//! is then torn by hand (a process kill cannot tear a write that reached the page cache, a
//! power loss can: the torn slot stands for that). A new server on the same directory
//! indexes the valid blocks and serves prompts from them with the same greedy output as
//! before; the torn slot is counted and never served.

#![allow(clippy::unwrap_used)] // tests may unwrap (workspace rule)

use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_kvmesh-gpu-server");
/// The tiny model's block: 2 layers x K,V x 16 tokens x 32 floats x 2 bytes.
const BLOCK_BYTES: u64 = 4096;
/// Slot: a 4 KiB header and the page-rounded block.
const SLOT_BYTES: u64 = 4096 + BLOCK_BYTES;

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(model: &Path, dir: &Path) -> Server {
    let mut child = Command::new(BIN)
        .args(["--model-name", "tiny", "--listen", "127.0.0.1:0"])
        .arg("--model")
        .arg(model)
        .args(["--kv-blocks", "10", "--kv-host-bytes", "0"])
        .args(["--kv-disk-bytes", &(64 * BLOCK_BYTES).to_string()])
        .arg("--kv-disk-dir")
        .arg(dir)
        .args(["--kv-fetch", "always"])
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            eprintln!("server: {line}");
            if line.contains("serving")
                && let Some(i) = line.find("127.0.0.1:")
            {
                let addr: String = line[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                    .collect();
                let _ = tx.send(addr);
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("server never said where it listens");
    Server {
        child,
        base: format!("http://{addr}"),
    }
}

async fn complete(http: &reqwest::Client, s: &Server, prompt: &str) -> (String, u64) {
    let r: Value = http
        .post(format!("{}/v1/completions", s.base))
        .json(&json!({"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": true}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (
        r["choices"][0]["text"].as_str().unwrap().to_string(),
        r["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap(),
    )
}

async fn debug(http: &reqwest::Client, s: &Server) -> Value {
    http.get(format!("{}/debug/cache", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn text(n: usize, salt: usize) -> String {
    (0..n)
        .map(|i| char::from(b'a' + ((i * (2 * salt + 3) + salt * 11 + i / 7) % 26) as u8))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_restarts_serving_only_valid_disk_blocks() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny.gguf");
    let st = Command::new(BIN)
        .args(["gen-tiny", "--out"])
        .arg(&model)
        .status()
        .unwrap();
    assert!(st.success());
    let dir = tmp.path().join("kv");
    let http = reqwest::Client::new();

    // Byte-level tokenizer: one token per character. The device tier holds 160 tokens, so
    // each 150-token prompt pushes the previous ones to disk, tail first.
    let p = text(100, 1);
    let q: Vec<String> = (2..5).map(|i| text(150, i)).collect();
    let s = start(&model, &dir);
    let (p_out, cached) = complete(&http, &s, &p).await;
    assert_eq!(cached, 0);
    let mut q_out = Vec::new();
    for x in &q[..2] {
        q_out.push(complete(&http, &s, x).await.0);
    }
    // The third prompt demotes all of q[1]; kill the server while it streams.
    let mut stream = http
        .post(format!("{}/v1/completions", s.base))
        .json(&json!({"model": "tiny", "prompt": q[2], "max_tokens": 9, "temperature": 0, "stream": true, "ignore_eos": true}))
        .send()
        .await
        .unwrap();
    assert!(stream.chunk().await.unwrap().is_some(), "streaming started");
    let mut s = s;
    s.child.kill().unwrap(); // SIGKILL
    s.child.wait().unwrap();
    drop(stream);

    // Tear the most recently written slot (q[1]'s first block, demoted last).
    let slab = dir.join("slab-0000.kv");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&slab)
        .unwrap();
    let slots = f.metadata().unwrap().len() / SLOT_BYTES;
    let mut last = (0u64, None);
    for i in 0..slots {
        let mut h = [0u8; 48];
        f.read_exact_at(&mut h, i * SLOT_BYTES).unwrap();
        if &h[..8] == b"KVMSLAB2" {
            let written = u64::from_le_bytes(h[40..48].try_into().unwrap());
            if written >= last.0 {
                last = (written, Some(i));
            }
        }
    }
    let torn = last.1.expect("blocks were written before the kill");
    f.write_all_at(&[0x5a; 512], torn * SLOT_BYTES + 4096 + 1024)
        .unwrap();
    drop(f);

    let s = start(&model, &dir);
    let d = debug(&http, &s).await;
    assert_eq!(d["disk"]["enabled"], true, "{}", d["disk"]);
    assert_eq!(d["disk"]["scan"]["corrupt"], 1, "{}", d["disk"]);
    // p (6 blocks) and q[0] (9 blocks) are intact; q[1] lost its head, so its other blocks
    // cannot be reached and are not indexed.
    assert_eq!(d["disk"]["restored"], 15, "{}", d["disk"]);
    let (out, cached) = complete(&http, &s, &p).await;
    assert_eq!((out.as_str(), cached), (p_out.as_str(), 96));
    let (out, cached) = complete(&http, &s, &q[0]).await;
    assert_eq!((out.as_str(), cached), (q_out[0].as_str(), 144));
    let (out, cached) = complete(&http, &s, &q[1]).await;
    assert_eq!(
        (out.as_str(), cached),
        (q_out[1].as_str(), 0),
        "the torn block is never served"
    );
    let metrics = http
        .get(format!("{}/metrics", s.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("kvmesh_kv_disk_corrupt_blocks 1"),
        "{metrics}"
    );
    assert!(metrics.contains("kvmesh_kv_tier_promotions_total{tier=\"disk\"} 15"));
}
