//! `epserve probe`: a health check for container engines that have no gRPC probe of their own
//! (Docker's and Compose's `healthcheck`, which run a command in the container). Exits 0 when the
//! component is healthy, 1 otherwise, and says why on stderr.

use std::io::{Read, Write};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

#[derive(Debug, clap::Args)]
pub struct ProbeArgs {
    #[command(subcommand)]
    pub what: Probe,
    /// Give up (unhealthy) after this long.
    #[arg(long, default_value_t = 3, global = true)]
    pub timeout_seconds: u64,
}

#[derive(Debug, clap::Subcommand)]
pub enum Probe {
    /// `grpc.health.v1.Health/Check` of a coordinator or worker: healthy when SERVING.
    Grpc {
        /// `host:port` of the gRPC server (plaintext).
        addr: String,
        /// The service asked about: empty for readiness, `liveness` for liveness.
        #[arg(long, default_value = "")]
        service: String,
    },
    /// `GET` on the gateway: healthy on a 2xx answer.
    Http {
        /// `host:port` of the gateway.
        addr: String,
        /// The path asked for: `/health` (liveness) or `/ready` (readiness).
        #[arg(long, default_value = "/health")]
        path: String,
    },
}

pub fn run(args: ProbeArgs) -> Result<()> {
    let timeout = Duration::from_secs(args.timeout_seconds.max(1));
    match args.what {
        Probe::Grpc { addr, service } => {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let status = runtime.block_on(async {
                tokio::time::timeout(timeout, grpc_status(&addr, &service))
                    .await
                    .with_context(|| format!("{addr}: no answer within {timeout:?}"))?
            })?;
            if status != ServingStatus::Serving {
                bail!("{addr} service {service:?}: {}", status.as_str_name());
            }
        }
        Probe::Http { addr, path } => {
            let status = http_status(&addr, &path, timeout)?;
            if !(200..300).contains(&status) {
                bail!("GET http://{addr}{path}: {status}");
            }
        }
    }
    Ok(())
}

async fn grpc_status(addr: &str, service: &str) -> Result<ServingStatus> {
    let channel = tonic::transport::Endpoint::from_shared(epserve_proto::server_uri(addr))?
        .connect()
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest { service: service.to_owned() })
        .await
        .with_context(|| format!("{addr}: grpc.health.v1.Health/Check"))?;
    Ok(ServingStatus::try_from(answer.into_inner().status).unwrap_or(ServingStatus::Unknown))
}

fn http_status(addr: &str, path: &str, timeout: Duration) -> Result<u16> {
    let target = addr.parse().with_context(|| format!("{addr}: not an IP address and port"))?;
    let mut s =
        std::net::TcpStream::connect_timeout(&target, timeout).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).with_context(|| format!("{addr}: reading the answer"))?;
    let code = std::str::from_utf8(&head[9..12]).ok().and_then(|c| c.parse().ok());
    code.with_context(|| format!("{addr}: not an HTTP answer"))
}
