//! Mutual TLS on the gRPC links, end to end with real processes: a worker and a coordinator started
//! with `--tls-*` serve a client with a certificate from the cluster CA and refuse one without a
//! certificate, one with another CA's and one in plaintext; the gateway and the CLI reach them
//! through TLS; rotated certificate files are picked up without a restart; a cluster registers
//! through etcd over TLS with client-certificate authentication and serves a completion.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use epserve_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use epserve_proto::v1::expert_service_client::ExpertServiceClient;
use epserve_proto::v1::{HealthRequest, StatusRequest};
use epserve_testkit::etcd_server::{EtcdServer, EtcdTls};
use epserve_tls::dev::DevCertificates;
use epserve_tls::{ClusterTls, TlsFiles};
use support::{Process, body_json, post, tiny_fixture};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// `--tls-cert F --tls-key F --tls-ca F` for `component`.
fn tls_flags(certs: &DevCertificates, component: &str) -> Vec<String> {
    let files = certs.files(component);
    [("--tls-cert", files.cert), ("--tls-key", files.key), ("--tls-ca", files.ca)]
        .into_iter()
        .flat_map(|(flag, path)| [flag.to_owned(), path.display().to_string()])
        .collect()
}

fn start(args: &[&str], extra: &[String]) -> Process {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(extra.iter().map(String::as_str));
    Process::start(&all)
}

fn endpoint(addr: &str) -> Endpoint {
    Endpoint::from_shared(format!("http://{addr}")).expect("uri").connect_timeout(Duration::from_secs(5))
}

/// A channel made with `tls` (mutual TLS, reloading) — `None`: plaintext.
async fn channel(addr: &str, tls: Option<&ClusterTls>) -> Result<Channel, String> {
    epserve_tls::connect(endpoint(addr), tls).await.map_err(|e| format!("{e:?}"))
}

/// A TLS channel that trusts `ca` but presents no client certificate (tonic's own TLS).
async fn channel_without_certificate(addr: &str, ca: &Path) -> Result<Channel, String> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).expect("ca")))
        .domain_name("localhost");
    let endpoint =
        Endpoint::from_shared(format!("https://{addr}")).expect("uri").tls_config(tls).map_err(|e| e.to_string())?;
    endpoint.connect().await.map_err(|e| format!("{e:?}"))
}

async fn worker_status(channel: Result<Channel, String>) -> Result<(), String> {
    let mut client = ExpertServiceClient::new(channel?);
    client.status(StatusRequest {}).await.map(|_| ()).map_err(|e| e.to_string())
}

async fn coordinator_health(channel: Result<Channel, String>) -> Result<(), String> {
    let mut client = CoordinatorServiceClient::new(channel?);
    client.health(HealthRequest {}).await.map(|_| ()).map_err(|e| e.to_string())
}

fn load(files: TlsFiles) -> ClusterTls {
    ClusterTls::load(files).expect("certificates load")
}

fn completion(addr: &str) -> serde_json::Value {
    let body = r#"{"model": "tiny-llama4", "prompt": "Hello", "max_tokens": 4, "temperature": 0, "ignore_eos": true}"#;
    let (status, response) = post(addr, "/v1/completions", body);
    assert_eq!(status, 200, "{response}");
    body_json(&response)
}

#[test]
fn grpc_links_serve_the_cluster_ca_and_refuse_everyone_else() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = epserve_tls::dev::issue(&dir.path().join("cluster"), &[]).expect("issue");
    let other = epserve_tls::dev::issue(&dir.path().join("other"), &[]).expect("issue");
    let model = tiny_fixture();
    let model = model.to_str().expect("utf-8");

    let worker =
        start(&["worker", "--model", model, "--listen", "127.0.0.1:0", "--shard", "0/1"], &tls_flags(&certs, "worker"));
    // The coordinator can only start if its TLS link to the worker works.
    let coordinator = start(
        &["coordinator", "--model", model, "--listen", "127.0.0.1:0", "--workers", &worker.addr],
        &tls_flags(&certs, "coordinator"),
    );
    let gateway = start(
        &["gateway", "--model", model, "--listen", "127.0.0.1:0", "--coordinators", &coordinator.addr],
        &tls_flags(&certs, "gateway"),
    );

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let client = load(certs.files("client"));
    // Another CA's client certificate, presented by a client that trusts our CA: only the server
    // can refuse it.
    let impostor = load(TlsFiles { ca: certs.ca(), ..other.files("client") });
    runtime.block_on(async {
        worker_status(channel(&worker.addr, Some(&client)).await).await.expect("the worker serves the cluster CA");
        coordinator_health(channel(&coordinator.addr, Some(&client)).await)
            .await
            .expect("the coordinator serves the cluster CA");

        for (what, outcome) in [
            ("worker, plaintext", worker_status(channel(&worker.addr, None).await).await),
            (
                "worker, no certificate",
                worker_status(channel_without_certificate(&worker.addr, &certs.ca()).await).await,
            ),
            ("worker, another CA", worker_status(channel(&worker.addr, Some(&impostor)).await).await),
            ("coordinator, plaintext", coordinator_health(channel(&coordinator.addr, None).await).await),
            (
                "coordinator, no certificate",
                coordinator_health(channel_without_certificate(&coordinator.addr, &certs.ca()).await).await,
            ),
            ("coordinator, another CA", coordinator_health(channel(&coordinator.addr, Some(&impostor)).await).await),
        ] {
            assert!(outcome.is_err(), "{what}: must be refused");
        }
    });

    // The gateway reaches the coordinator, and the coordinator the worker, over TLS.
    let deadline = Instant::now() + Duration::from_secs(30);
    while post(&gateway.addr, "/ready", "").0 != 200 {
        assert!(Instant::now() < deadline, "the gateway did not become ready over TLS");
        std::thread::sleep(Duration::from_millis(100));
    }
    let done = completion(&gateway.addr);
    assert_eq!(done["usage"]["completion_tokens"], 4, "{done}");

    // `epserve bench --coordinator` speaks TLS with `--tls-*`.
    let mut bench = vec!["bench", "--coordinator", &coordinator.addr, "--requests", "2", "--input-len", "4"];
    bench.extend(["--output-len", "2", "--json"]);
    let flags = tls_flags(&certs, "client");
    bench.extend(flags.iter().map(String::as_str));
    let report = support::run_json(&bench);
    assert_eq!(report["requests_ok"], 2, "{report}");
}

#[test]
fn rotated_certificates_are_used_without_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = dir.path().join("live");
    let first = epserve_tls::dev::issue(&live, &[]).expect("issue");
    // The first client identity, kept aside: the rotation below replaces the files in `live`.
    let aside = dir.path().join("aside");
    let old = epserve_tls::dev::issue(&aside, &[]).expect("issue");
    for (from, to) in [
        (first.files("client").cert, old.files("client").cert),
        (first.files("client").key, old.files("client").key),
        (first.ca(), old.ca()),
    ] {
        std::fs::copy(from, to).expect("copy");
    }
    let model = tiny_fixture();
    let model = model.to_str().expect("utf-8");
    let worker =
        start(&["worker", "--model", model, "--listen", "127.0.0.1:0", "--shard", "0/1"], &tls_flags(&first, "worker"));

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let old_client = load(old.files("client"));
    runtime.block_on(async {
        worker_status(channel(&worker.addr, Some(&old_client)).await).await.expect("served before the rotation");
    });

    // A new CA and new certificates replace the files the worker was started with.
    let rotated = epserve_tls::dev::issue(&live, &[]).expect("issue");
    let new_client = load(rotated.files("client"));
    // The worker looks at its files at most once a second.
    let deadline = Instant::now() + Duration::from_secs(10);
    runtime.block_on(async {
        loop {
            match worker_status(channel(&worker.addr, Some(&new_client)).await).await {
                Ok(()) => break,
                Err(e) => assert!(Instant::now() < deadline, "the rotated certificates were not picked up: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let refused = worker_status(channel(&worker.addr, Some(&old_client)).await).await;
        assert!(refused.is_err(), "a certificate of the replaced CA must be refused after the rotation");
    });
}

#[test]
fn a_cluster_registers_through_etcd_with_client_certificates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = epserve_tls::dev::issue(&dir.path().join("certs"), &[]).expect("issue");
    let server = certs.files("etcd");
    let etcd = EtcdServer::start_tls(dir.path(), EtcdTls { cert: server.cert, key: server.key, ca: server.ca })
        .expect("start etcd with --client-cert-auth (Debian package etcd-server)");
    let url = etcd.url();
    assert!(url.starts_with("etcds://"), "{url}");
    let model = tiny_fixture();
    let model = model.to_str().expect("utf-8");
    let registry = |component: &str| {
        let files = certs.files(component);
        let mut flags: Vec<String> =
            ["--registry", &url, "--cluster", "tls", "--lease-ttl-ms", "2000"].map(String::from).to_vec();
        for (flag, path) in
            [("--registry-ca", files.ca), ("--registry-cert", files.cert), ("--registry-key", files.key)]
        {
            flags.extend([flag.to_owned(), path.display().to_string()]);
        }
        flags.extend(tls_flags(&certs, component));
        flags
    };
    let _worker =
        start(&["worker", "--model", model, "--listen", "127.0.0.1:0", "--shard", "0/1"], &registry("worker"));
    let _coordinator = start(&["coordinator", "--model", model, "--listen", "127.0.0.1:0"], &registry("coordinator"));
    let gateway = start(
        &["gateway", "--model", model, "--listen", "127.0.0.1:0", "--health-interval-ms", "200"],
        &registry("gateway"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while post(&gateway.addr, "/ready", "").0 != 200 {
        assert!(Instant::now() < deadline, "the gateway found no coordinator through etcd over TLS within 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    let done = completion(&gateway.addr);
    assert_eq!(done["usage"]["completion_tokens"], 4, "{done}");

    // Without a client certificate etcd refuses the connection (its own `--client-cert-auth`).
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let client = certs.files("client");
    let member = epserve_control::RegistrySecurity {
        ca: Some(client.ca),
        cert: Some(client.cert),
        key: Some(client.key),
        credentials: None,
    };
    let workers = runtime
        .block_on(async {
            epserve_control::connect_with(&url, "tls", &member).await?.list(epserve_control::Kind::Worker).await
        })
        .expect("a client with a certificate lists the registered workers");
    assert_eq!(workers.len(), 1, "{workers:?}");
    let anonymous = epserve_control::RegistrySecurity { ca: Some(certs.ca()), ..Default::default() };
    let listed = runtime.block_on(async {
        let plane = epserve_control::connect_with(&url, "tls", &anonymous).await.map_err(|e| e.to_string())?;
        plane.list(epserve_control::Kind::Worker).await.map_err(|e| e.to_string())
    });
    assert!(listed.is_err(), "etcd must refuse a client without a certificate: {listed:?}");
}

#[test]
fn epserve_certs_issues_a_ca_and_component_certificates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("certs");
    let printed =
        support::run_ok(&["certs", "--out", out.to_str().expect("utf-8"), "--hosts", "node-1.internal,10.1.2.3"]);
    let certs = DevCertificates { dir: out.clone() };
    for component in epserve_tls::dev::COMPONENTS {
        let files = certs.files(component);
        assert!(printed.contains(&files.cert.display().to_string()), "{printed}");
        load(files.clone());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&files.key).expect("key").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", files.key.display());
        }
    }
    assert!(out.join(epserve_tls::dev::CA_KEY).exists());
}
