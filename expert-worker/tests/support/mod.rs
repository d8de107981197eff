//! What the worker's integration tests share: the tiny checkpoint, a worker configuration on a free
//! loopback port, and a worker served in the background until the test stops it.

#![allow(dead_code)] // each test binary uses its own part

use std::net::SocketAddr;
use std::path::PathBuf;

use candle_core::DType;
use epserve_control::ControlConnection;
use epserve_expert_worker::{ExpertSelection, RunError, WorkerConfig};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The tiny Llama-4 checkpoint (4 MoE layers of 16 experts).
pub fn tiny_checkpoint() -> PathBuf {
    epserve_testkit::fixtures::dir(epserve_testkit::fixtures::TINY_LLAMA4)
}

/// A worker of the tiny checkpoint in f32 hosting `selection`, on a free loopback port.
pub fn config(selection: ExpertSelection, control: Option<ControlConnection>) -> WorkerConfig {
    WorkerConfig {
        model: tiny_checkpoint(),
        listen: "127.0.0.1:0".into(),
        selection,
        dtype: DType::F32,
        weights: Default::default(),
        control,
        limits: Default::default(),
        // gRPC only: these tests are about the service; the shared-memory link has its own.
        shm_dir: None,
    }
}

/// A worker serving in the background.
pub struct Serving {
    pub addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), RunError>>,
}

/// Starts a worker from `config` and serves it until [`Serving::stop`].
pub async fn serve(config: WorkerConfig) -> Serving {
    let worker = epserve_expert_worker::start(config).await.expect("worker starts");
    let addr = worker.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(worker.serve(async move {
        let _ = stopped.await;
    }));
    Serving { addr, stop, task }
}

impl Serving {
    /// Asks the worker to shut down and waits (30 s at most) until it has.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(std::time::Duration::from_secs(30), self.task)
            .await
            .expect("stops in time")
            .expect("task")
            .expect("serve");
    }
}
