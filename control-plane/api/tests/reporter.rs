//! The Reporter against a real tonic ReplicaState server on 127.0.0.1:
//! registration first, snapshot then deltas with consecutive seqs, a resync
//! answered with the full state, and a reconnect after the server restarts.

use std::net::SocketAddr;
use std::time::Duration;

use kvmesh_control_plane_api::grpc::replica_state_server::{ReplicaState, ReplicaStateServer};
use kvmesh_control_plane_api::proto::{
    ControlMessage, Load, Register, Registered, ReplicaReport, ResyncRequest, Tier, TierChunks,
    control_message, replica_report::Event,
};
use kvmesh_control_plane_api::{Backoff, ConnState, Reporter, ReporterConfig};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// Records every report; the test gets a sender per stream to talk back.
#[derive(Clone)]
struct Recorder {
    reports: mpsc::UnboundedSender<ReplicaReport>,
    streams: mpsc::UnboundedSender<mpsc::Sender<Result<ControlMessage, Status>>>,
    /// Fired to end every stream (a crash, as the client sees it).
    kill: tokio::sync::broadcast::Sender<()>,
    /// Once false, new streams are refused (the server is going down).
    alive: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

#[tonic::async_trait]
impl ReplicaState for Recorder {
    type ReportStream = ReceiverStream<Result<ControlMessage, Status>>;
    async fn report(
        &self,
        req: Request<Streaming<ReplicaReport>>,
    ) -> Result<Response<Self::ReportStream>, Status> {
        if !self.alive.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Status::unavailable("going down"));
        }
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let _ = self.streams.send(tx.clone());
        let reports = self.reports.clone();
        let mut kill = self.kill.subscribe();
        tokio::spawn(async move {
            loop {
                let r = tokio::select! {
                    _ = kill.recv() => {
                        let _ = tx.send(Err(Status::unavailable("killed"))).await;
                        return;
                    }
                    r = inbound.next() => match r { Some(Ok(r)) => r, _ => return },
                };
                if let Some(Event::Register(reg)) = &r.event {
                    let msg = control_message::Msg::Registered(Registered {
                        replica_id: reg.replica_id.clone(),
                    });
                    let _ = tx.send(Ok(ControlMessage { msg: Some(msg) })).await;
                }
                let _ = reports.send(r);
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

struct Server {
    stop: oneshot::Sender<()>,
    done: tokio::task::JoinHandle<()>,
}

async fn start(listener: TcpListener, rec: Recorder) -> Server {
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(ReplicaStateServer::new(rec))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            })
            .await;
    });
    Server { stop, done }
}

async fn next_event(rx: &mut mpsc::UnboundedReceiver<ReplicaReport>) -> Event {
    // Skip heartbeats/loads unless a test asks for them.
    loop {
        let r = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("report in time")
            .expect("open");
        match r.event.expect("event set") {
            Event::Load(_) => continue,
            e => return e,
        }
    }
}

fn device(chunks: &[u64]) -> Vec<TierChunks> {
    vec![TierChunks {
        tier: Tier::Device as i32,
        chunks: chunks.to_vec(),
    }]
}

#[tokio::test]
async fn registers_streams_resyncs_and_reconnects() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    let (reports_tx, mut reports) = mpsc::unbounded_channel();
    let (streams_tx, mut streams) = mpsc::unbounded_channel();
    let (kill, _) = tokio::sync::broadcast::channel(1);
    let alive = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let rec = Recorder {
        reports: reports_tx,
        streams: streams_tx,
        kill,
        alive,
    };
    let server = start(listener, rec.clone()).await;

    let register = Register {
        replica_id: "r1".into(),
        address: "127.0.0.1:9".into(),
        model: "m".into(),
        ..Default::default()
    };
    let mut config = ReporterConfig::new(format!("http://{addr}"), register.clone());
    config.backoff = Backoff {
        min: Duration::from_millis(20),
        max: Duration::from_millis(200),
    };
    let reporter = Reporter::spawn(config);
    // Reported before the stream is up: must be part of the first snapshot.
    reporter.residency(device(&[1, 2]), vec![]);

    assert_eq!(
        next_event(&mut reports).await,
        Event::Register(register.clone())
    );
    let Event::Snapshot(s) = next_event(&mut reports).await else {
        panic!("snapshot expected")
    };
    assert_eq!((s.seq, s.resident), (1, device(&[1, 2])));
    let mut state = reporter.state();
    state
        .wait_for(|s| matches!(s, ConnState::Registered { streams: 1 }))
        .await
        .expect("registered");

    reporter.residency(device(&[3]), device(&[1]));
    let Event::Delta(d) = next_event(&mut reports).await else {
        panic!("delta expected")
    };
    assert_eq!((d.seq, d.added, d.removed), (2, device(&[3]), device(&[1])));

    // Load goes out when it changes.
    reporter.load(Load {
        waiting: 3,
        ..Default::default()
    });
    loop {
        let r = reports.recv().await.expect("open");
        if let Some(Event::Load(l)) = r.event
            && l.waiting == 3
        {
            break;
        }
    }

    // The control plane asks for a resync: full state, next seq.
    let control = streams.recv().await.expect("stream");
    let resync = control_message::Msg::Resync(ResyncRequest {
        reason: "test".into(),
    });
    control
        .send(Ok(ControlMessage { msg: Some(resync) }))
        .await
        .expect("send resync");
    let Event::Snapshot(s) = next_event(&mut reports).await else {
        panic!("snapshot expected")
    };
    assert_eq!((s.seq, s.resident), (3, device(&[2, 3])));

    // The server goes away; changes made meanwhile arrive in the resync.
    drop(control);
    rec.alive.store(false, std::sync::atomic::Ordering::SeqCst);
    let _ = rec.kill.send(());
    let _ = server.stop.send(());
    server.done.await.expect("server stopped");
    state
        .wait_for(|s| matches!(s, ConnState::Connecting { .. }))
        .await
        .expect("noticed the loss");
    reporter.cleared();
    reporter.residency(device(&[7]), vec![]);
    let listener = TcpListener::bind(addr).await.expect("rebind same port");
    let fresh = Recorder {
        alive: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
        ..rec
    };
    let _server = start(listener, fresh).await;
    assert_eq!(next_event(&mut reports).await, Event::Register(register));
    let Event::Snapshot(s) = next_event(&mut reports).await else {
        panic!("snapshot expected")
    };
    assert_eq!((s.seq, s.resident), (1, device(&[7])));
    state
        .wait_for(|s| matches!(s, ConnState::Registered { streams: 2 }))
        .await
        .expect("registered again");
}
