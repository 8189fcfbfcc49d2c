//! The `kvmesh.v1.ReplicaState/Report` endpoint with its own gRPC framing.
//!
//! tonic's generated server decodes a request stream into one buffer per
//! stream that grows to the largest message and keeps that size for the
//! stream's life. A replica's residency snapshot is one message (10,000
//! chunks are 80 KB), so 1,000 replicas kept about 110 MB of such buffers
//! after registering. Here a message is assembled in a buffer of its own size
//! only when it spans body frames, and dropped once decoded. Responses are
//! framed the same way as tonic's (uncompressed; requests that use
//! compression are refused with a clear status).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use http_body_util::{BodyExt, StreamBody};
use kvmesh_plugins_sdk::proto::{ControlMessage, ReplicaReport};
use prost::Message;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http::{HeaderMap, HeaderValue, Request, Response};
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;

use crate::app::App;

/// The method's path.
pub const PATH: &str = "/kvmesh.v1.ReplicaState/Report";
const HEADER: usize = 5;

/// Length-prefixed gRPC messages out of body chunks.
#[derive(Debug, Default)]
pub struct Frames {
    chunks: VecDeque<Bytes>,
    buffered: usize,
}

impl Frames {
    pub fn push(&mut self, data: Bytes) {
        self.buffered += data.len();
        if !data.is_empty() {
            self.chunks.push_back(data);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.buffered == 0
    }

    fn peek_header(&self) -> [u8; HEADER] {
        let mut h = [0u8; HEADER];
        let mut i = 0;
        for c in &self.chunks {
            for &b in c.iter() {
                if i == HEADER {
                    return h;
                }
                h[i] = b;
                i += 1;
            }
        }
        h
    }

    /// The next whole message, `None` until one is buffered.
    pub fn next_message(&mut self, max: usize) -> Result<Option<Bytes>, Status> {
        if self.buffered < HEADER {
            return Ok(None);
        }
        let h = self.peek_header();
        if h[0] != 0 {
            return Err(Status::unimplemented(
                "compressed messages are not accepted on ReplicaState/Report",
            ));
        }
        let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
        if len > max {
            return Err(Status::out_of_range(format!(
                "message of {len} bytes exceeds the limit of {max}"
            )));
        }
        if self.buffered < HEADER + len {
            return Ok(None);
        }
        self.take(HEADER);
        Ok(Some(self.take(len)))
    }

    /// Removes `n` buffered bytes: a slice of the first chunk when it holds
    /// them all, else a copy into a buffer of exactly `n` bytes.
    fn take(&mut self, n: usize) -> Bytes {
        self.buffered -= n;
        if let Some(first) = self.chunks.front_mut()
            && first.len() >= n
        {
            let out = first.split_to(n);
            if first.is_empty() {
                self.chunks.pop_front();
            }
            return out;
        }
        let mut out = BytesMut::with_capacity(n);
        while out.len() < n {
            let Some(first) = self.chunks.front_mut() else {
                break;
            };
            let k = first.len().min(n - out.len());
            out.put_slice(&first[..k]);
            first.advance(k);
            if first.is_empty() {
                self.chunks.pop_front();
            }
        }
        out.freeze()
    }
}

/// The reports of one request body.
pub fn reports<B>(body: B, max: usize) -> impl Stream<Item = Result<ReplicaReport, Status>> + Send
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display,
{
    futures::stream::unfold(Some((body, Frames::default())), move |state| async move {
        let (mut body, mut frames) = state?;
        loop {
            match frames.next_message(max) {
                Err(status) => return Some((Err(status), None)),
                Ok(Some(raw)) => {
                    let item = ReplicaReport::decode(raw).map_err(|e| {
                        Status::invalid_argument(format!("undecodable ReplicaReport: {e}"))
                    });
                    let next = item.is_ok().then_some((body, frames));
                    return Some((item, next));
                }
                Ok(None) => {}
            }
            match body.frame().await {
                None if frames.is_empty() => return None,
                None => {
                    return Some((Err(Status::internal("stream ended inside a message")), None));
                }
                Some(Err(e)) => return Some((Err(Status::unknown(e.to_string())), None)),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        frames.push(data);
                    }
                }
            }
        }
    })
}

/// One response message, framed.
pub fn frame(msg: &ControlMessage) -> Bytes {
    let len = msg.encoded_len();
    let mut buf = BytesMut::with_capacity(HEADER + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    msg.encode(&mut buf).ok();
    buf.freeze()
}

fn trailers(status: &Status) -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from(status.code() as i32));
    if let Ok(v) = HeaderValue::from_str(status.message()) {
        t.insert("grpc-message", v);
    }
    t
}

fn grpc_response(body: Body) -> Response<Body> {
    let mut resp = Response::new(body);
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    resp
}

/// A tower service for the ReplicaState service, to add to tonic's router in
/// place of the generated server.
#[derive(Debug, Clone)]
pub struct ReportService {
    pub app: Arc<App>,
    pub max_message_bytes: usize,
}

impl NamedService for ReportService {
    const NAME: &'static str = "kvmesh.v1.ReplicaState";
}

impl Service<Request<Body>> for ReportService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let app = self.app.clone();
        let max = self.max_message_bytes;
        Box::pin(async move {
            if req.uri().path() != PATH {
                let status = Status::unimplemented(format!("no method {}", req.uri().path()));
                let mut resp = grpc_response(Body::empty());
                resp.headers_mut().extend(trailers(&status));
                return Ok(resp);
            }
            let peer: Option<SocketAddr> = req
                .extensions()
                .get::<tonic::transport::server::TcpConnectInfo>()
                .and_then(|i| i.remote_addr());
            let inbound = Box::pin(reports(req.into_body(), max));
            let replies = crate::app::serve_reports(app, inbound, peer);
            let data = tokio_stream::wrappers::ReceiverStream::new(replies)
                .map(|m| Ok::<_, Status>(http_body::Frame::data(frame(&m))));
            let end = futures::stream::once(async {
                Ok(http_body::Frame::trailers(trailers(&Status::ok(""))))
            });
            Ok(grpc_response(Body::new(StreamBody::new(data.chain(end)))))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvmesh_plugins_sdk::proto::{Load, replica_report};

    fn framed(r: &ReplicaReport) -> Vec<u8> {
        let body = r.encode_to_vec();
        let mut v = vec![0];
        v.extend_from_slice(&(body.len() as u32).to_be_bytes());
        v.extend_from_slice(&body);
        v
    }

    fn report(waiting: u32) -> ReplicaReport {
        ReplicaReport {
            event: Some(replica_report::Event::Load(Load {
                waiting,
                ..Default::default()
            })),
        }
    }

    #[test]
    fn messages_split_and_joined_across_chunks() {
        let mut wire = framed(&report(1));
        wire.extend(framed(&report(2)));
        wire.extend(framed(&report(300)));
        // Every way of cutting the bytes into chunks gives the same messages.
        for cut in 1..wire.len() {
            let mut f = Frames::default();
            let mut got = Vec::new();
            for piece in wire.chunks(cut) {
                f.push(Bytes::copy_from_slice(piece));
                while let Some(m) = f.next_message(1 << 20).expect("frame") {
                    got.push(ReplicaReport::decode(m).expect("decode"));
                }
            }
            assert_eq!(got, vec![report(1), report(2), report(300)], "cut {cut}");
            assert!(f.is_empty());
        }
    }

    #[test]
    fn oversized_and_compressed_messages_are_refused() {
        let mut f = Frames::default();
        f.push(Bytes::from_static(&[0, 0, 0, 1, 0]));
        assert_eq!(
            f.next_message(100).expect_err("too big").code(),
            tonic::Code::OutOfRange
        );
        let mut f = Frames::default();
        f.push(Bytes::from_static(&[1, 0, 0, 0, 1, 0]));
        assert_eq!(
            f.next_message(100).expect_err("compressed").code(),
            tonic::Code::Unimplemented
        );
    }

    #[test]
    fn response_frames_decode() {
        let m = ControlMessage::default();
        let f = frame(&m);
        let mut frames = Frames::default();
        frames.push(f);
        let raw = frames.next_message(100).expect("frame").expect("whole");
        assert_eq!(ControlMessage::decode(raw).expect("decode"), m);
    }
}
