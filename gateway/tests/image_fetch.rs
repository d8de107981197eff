//! `--image-fetch`: image URLs fetched from a loopback HTTP server spawned here. Fetching works
//! only when enabled, loopback only with `--image-fetch-allow-private` (whether the URL names the
//! address or a name that resolves to it), redirects to other schemes are refused, and the byte
//! limit and the deadline hold.

mod support;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use epserve_gateway::ImageConfig;
use epserve_gateway::images::fetch::FetchConfig;
use epserve_testkit::fixtures;
use serde_json::{Value, json};
use support::{Harness, data_uri, gateway_prompt, image_part, images, png, text_part, vision_cases};

/// The byte limit of the harnesses here: wide.png (473 bytes) fits.
const LIMIT: usize = 4096;

/// A loopback HTTP server with an image, redirects, an endless body, a slow answer. Counts the
/// requests it receives.
struct ImageServer {
    port: u16,
    hits: Arc<AtomicUsize>,
}

impl ImageServer {
    async fn start() -> ImageServer {
        let hits = Arc::new(AtomicUsize::new(0));
        let redirect = |to: &'static str| move || async move { (StatusCode::FOUND, [(header::LOCATION, to)]) };
        let app = Router::new()
            .route("/wide.png", get(|| async { ([(header::CONTENT_TYPE, "image/png")], png("wide.png")) }))
            .route("/to-wide", get(redirect("/wide.png")))
            .route("/to-file", get(redirect("file:///etc/passwd")))
            .route("/to-ftp", get(redirect("ftp://127.0.0.1/wide.png")))
            .route("/loop", get(redirect("/loop")))
            .route("/endless", get(endless))
            .route("/declared-big", get(|| async { vec![0u8; LIMIT + 1] }))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    png("wide.png")
                }),
            )
            .layer(axum::middleware::from_fn_with_state(hits.clone(), count))
            .with_state(hits.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        ImageServer { port, hits }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

async fn count(
    State(hits): State<Arc<AtomicUsize>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    hits.fetch_add(1, Ordering::SeqCst);
    next.run(request).await
}

/// A chunked body (no Content-Length) that goes on far past any limit, a little at a time; it ends
/// when the client stops reading.
async fn endless() -> impl IntoResponse {
    let chunks = futures_util::stream::unfold(0u32, |n| async move {
        if n == 100_000 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        Some((Ok::<_, Infallible>(Bytes::from(vec![0u8; 64 << 10])), n + 1))
    });
    Body::from_stream(chunks)
}

fn fetching(allow_private: bool, timeout: Duration) -> ImageConfig {
    ImageConfig { max_image_bytes: LIMIT, ..images(Some(FetchConfig { timeout, allow_private })) }
}

fn with_url(url: &str) -> Value {
    json!([{"role": "user", "content": [image_part(url), text_part("What do you see?")]}])
}

const AT: &str = "messages[0].content[0]";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loopback_url_is_fetched_when_private_addresses_are_allowed() {
    let server = ImageServer::start().await;
    let gw = Harness::start(fixtures::TINY_LLAMA4, fetching(true, Duration::from_secs(10))).await;
    let wide = &vision_cases()[0];
    let by_name = format!("http://localhost:{}/wide.png", server.port);
    for url in [server.url("/wide.png"), by_name, server.url("/to-wide")] {
        let (status, body) = gw.chat(with_url(&url)).await;
        assert_eq!(status, 200, "{url}: {body}");
        let request = gw.received().last().expect("request").clone();
        assert_eq!(request.prompt_tokens, gateway_prompt(wide), "{url}");
        assert_eq!(request.images.len(), 1);
    }
    // The same tiles as the same image sent inline.
    let (status, _) = gw.chat(with_url(&data_uri(&png("wide.png")))).await;
    assert_eq!(status, 200);
    let received = gw.received();
    assert!(received.iter().all(|r| r.images == received[0].images));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urls_are_refused_when_fetching_is_off() {
    let server = ImageServer::start().await;
    let gw = Harness::start(fixtures::TINY_LLAMA4, images(None)).await;
    let m = gw.refused(with_url(&server.url("/wide.png")), AT).await;
    assert!(m.contains("--image-fetch") && m.contains("data:"), "{m}");
    assert_eq!(server.hits(), 0);
}

/// With `--image-fetch` alone, no internal address is connected to, however the URL names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_addresses_are_refused_by_default() {
    let server = ImageServer::start().await;
    let gw = Harness::start(fixtures::TINY_LLAMA4, fetching(false, Duration::from_secs(10))).await;
    let port = server.port;
    let urls = [
        server.url("/wide.png"),
        format!("http://localhost:{port}/wide.png"),
        format!("http://[::1]:{port}/wide.png"),
        format!("http://[::ffff:127.0.0.1]:{port}/wide.png"),
        format!("http://2130706433:{port}/wide.png"),
        format!("http://0.0.0.0:{port}/wide.png"),
    ];
    for url in urls {
        let m = gw.refused(with_url(&url), AT).await;
        assert!(m.contains("refused to fetch"), "{url}: {m}");
        assert!(m.contains("loopback") || m.contains("unspecified") || m.contains("resolve"), "{url}: {m}");
    }
    assert_eq!(server.hits(), 0, "no connection was made");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_to_other_schemes_and_loops_are_refused() {
    let server = ImageServer::start().await;
    let gw = Harness::start(fixtures::TINY_LLAMA4, fetching(true, Duration::from_secs(10))).await;
    for (path, scheme) in [("/to-file", "file"), ("/to-ftp", "ftp")] {
        let m = gw.refused(with_url(&server.url(path)), AT).await;
        assert!(m.contains("redirect") && m.contains(&format!("'{scheme}'")), "{path}: {m}");
    }
    let m = gw.refused(with_url(&server.url("/loop")), AT).await;
    assert!(m.contains("redirects"), "{m}");
    assert!(gw.received().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_byte_limit_holds_while_the_body_streams() {
    let server = ImageServer::start().await;
    // A deadline far longer than reading past the limit takes: the refusal must be for size.
    let gw = Harness::start(fixtures::TINY_LLAMA4, fetching(true, Duration::from_secs(60))).await;
    for path in ["/endless", "/declared-big"] {
        let m = gw.refused(with_url(&server.url(path)), AT).await;
        assert!(m.contains(&format!("larger than the limit of {LIMIT} bytes")), "{path}: {m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_server_runs_into_the_deadline() {
    let server = ImageServer::start().await;
    let gw = Harness::start(fixtures::TINY_LLAMA4, fetching(true, Duration::from_millis(300))).await;
    let m = gw.refused(with_url(&server.url("/slow")), AT).await;
    assert!(m.contains("took longer than 0.3 s"), "{m}");
    let m = gw.refused(with_url(&server.url("/missing")), AT).await;
    assert!(m.contains("404"), "{m}");
}
