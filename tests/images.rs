//! Images end to end, below the HTTP API: `epserve logits/generate --image` against the goldens, and
//! the coordinator's engine (expert workers over gRPC, prefill chunks that split an image, two images
//! in one message, preemption and recompute) giving the tokens of the in-process `generate`.

mod support;

use std::path::{Path, PathBuf};

use epserve_imaging::{DecodeLimits, ProcessorConfig};
use epserve_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use epserve_proto::v1::{GenerateRequest, ImageTiles, LoadRequest, SamplingParams};
use epserve_testkit::golden::{VisionCase, vision_cases};
use support::{Process, tiny_fixture, workers};

fn golden() -> Vec<VisionCase> {
    vision_cases(&tiny_fixture())
}

/// The user text of the golden vision prompts (after the image).
const TEXT: &str = "What do you see?";

fn image(name: &str) -> PathBuf {
    tiny_fixture().join("golden").join(name)
}

fn utf8(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// An image as the gateway sends it: decoded and cut into tiles with the checkpoint's settings.
fn tiles(path: &Path) -> ImageTiles {
    let processor = ProcessorConfig::from_checkpoint(&tiny_fixture()).expect("processor config");
    let bytes = std::fs::read(path).expect("image");
    let decoded = epserve_imaging::decode(&bytes, &DecodeLimits::default()).expect("decode");
    let t = epserve_imaging::preprocess(&decoded, &processor);
    ImageTiles { rows: t.rows as u32, cols: t.cols as u32, tile_size: t.tile_size as u32, pixels: t.pixels.into() }
}

/// `epserve generate --chat --image ... --json`: the prompt ids after expansion and the greedy tokens.
fn generated(images: &[&Path], max_tokens: u32) -> (Vec<u32>, Vec<u32>) {
    let model = tiny_fixture();
    let max_tokens = max_tokens.to_string();
    let mut args = vec![
        "generate",
        "--model",
        utf8(&model),
        "--prompt",
        TEXT,
        "--chat",
        "--json",
        "--max-tokens",
        &max_tokens,
        "--ignore-eos",
    ];
    for path in images {
        args.extend(["--image", utf8(path)]);
    }
    let out = support::run_json(&args);
    let ids = |key: &str| serde_json::from_value::<Vec<u32>>(out[key].clone()).unwrap_or_else(|e| panic!("{key}: {e}"));
    (ids("prompt_tokens"), ids("tokens"))
}

fn request(id: &str, prompt: &[u32], images: &[&Path], max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        request_id: id.into(),
        prompt_tokens: prompt.to_vec(),
        sampling: Some(SamplingParams { temperature: 0.0, max_tokens, ignore_eos: true, ..Default::default() }),
        priority: 0,
        images: images.iter().map(|p| tiles(p)).collect(),
        constraint: None,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

/// The golden `input_ids` as a chat prompt is served: transformers' processor, run on the rendered
/// template, tokenizes with special tokens and so starts with BOS twice (reference §7, pitfall 12);
/// the template writes BOS itself, and epserve, like vLLM and `apply_chat_template`, adds none.
fn served_chat_ids(golden: &[u32]) -> Vec<u32> {
    assert_eq!(golden[0], golden[1], "the golden starts with BOS twice");
    golden[1..].to_vec()
}

/// The CLI's own preprocessing reproduces the goldens: from the golden ids and the PNG, the last
/// position's logits within 1e-3; and `--prompt --chat --image` expands the chat turn into the
/// golden's ids (with one BOS).
#[test]
fn logits_and_generate_with_an_image_match_the_goldens() {
    let model = tiny_fixture();
    for case in golden() {
        let path = image(&case.image);
        let ids = case.input_ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        let out =
            support::run_json(&["logits", "--model", utf8(&model), "--tokens", &ids, "--image", utf8(&path), "--last"]);
        let logits: Vec<Vec<f32>> = serde_json::from_value(out["logits"].clone()).expect("logits");
        let last = logits.last().expect("a row");
        let diff = last.iter().zip(&case.last_logits).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(diff < 1e-3, "{}: last logits differ from the golden by {diff}", case.image);

        let out = support::run_json(&[
            "logits",
            "--model",
            utf8(&model),
            "--prompt",
            TEXT,
            "--chat",
            "--image",
            utf8(&path),
            "--last",
        ]);
        let prompt: Vec<u32> = serde_json::from_value(out["prompt_tokens"].clone()).expect("prompt_tokens");
        assert_eq!(prompt, served_chat_ids(&case.input_ids), "{}: expanded prompt", case.image);
        let (generate_prompt, _) = generated(&[&path], 2);
        assert_eq!(generate_prompt, prompt, "{}: generate's expanded prompt", case.image);
    }
}

/// Through four expert workers, with steps of 16 tokens (every image's `<|patch|>` run is split
/// across prefill chunks), one image and then two images in one message give the greedy tokens of
/// the in-process `generate`.
#[test]
fn image_requests_through_four_workers_in_chunks_match_generate() {
    let model = tiny_fixture();
    let pool = workers(&model, &[&["--shard", "0/4"], &["--shard", "1/4"], &["--shard", "2/4"], &["--shard", "3/4"]]);
    let addrs = pool.iter().map(|w| w.addr.as_str()).collect::<Vec<_>>().join(",");
    let coordinator = support::coordinator(
        utf8(&model),
        &["--workers", &addrs, "--wire-dtype", "f32", "--max-batch-tokens", "16", "--kv-block-size", "4"],
    );
    let (wide, small) = (image("wide.png"), image("small.png"));
    let rt = runtime();
    for images in [vec![wide.as_path()], vec![small.as_path()], vec![wide.as_path(), small.as_path()]] {
        let (prompt, expected) = generated(&images, 12);
        let tokens =
            rt.block_on(support::generate_to_length(&coordinator.addr, request("chunked", &prompt, &images, 12)));
        assert_eq!(tokens, expected, "images {images:?}: coordinator through workers vs generate");
    }
}

/// A KV cache far too small for the requests at once: image requests are preempted, recomputed
/// (their images encoded again) and still give the tokens they give alone.
#[test]
fn preempted_image_requests_resume_with_the_same_tokens() {
    let model = tiny_fixture();
    let coordinator = support::coordinator(
        utf8(&model),
        &["--kv-capacity-tokens", "160", "--kv-block-size", "4", "--max-batch-tokens", "32"],
    );
    let (wide, small) = (image("wide.png"), image("small.png"));
    let cases: Vec<Vec<&Path>> = vec![vec![&wide], vec![&small], vec![&wide, &small], vec![&small, &wide]];
    let prompts: Vec<Vec<u32>> = cases.iter().map(|images| generated(images, 1).0).collect();
    let rt = runtime();
    rt.block_on(async {
        let addr = coordinator.addr.clone();
        let mut alone = Vec::new();
        for (i, images) in cases.iter().enumerate() {
            alone.push(
                support::generate_to_length(&addr, request(&format!("alone-{i}"), &prompts[i], images, 40)).await,
            );
        }
        let handles: Vec<_> = (0..8)
            .map(|k| {
                let i = k % cases.len();
                let request = request(&format!("together-{k}"), &prompts[i], &cases[i], 40);
                let addr = addr.clone();
                (i, tokio::spawn(async move { support::generate_to_length(&addr, request).await }))
            })
            .collect();
        for (i, handle) in handles {
            assert_eq!(handle.await.expect("task"), alone[i], "case {i} under preemption");
        }
        let mut client = CoordinatorServiceClient::connect(format!("http://{addr}")).await.expect("connect");
        let load = client.load(LoadRequest {}).await.expect("load").into_inner();
        assert!(load.preemptions > 0, "the cache was small enough to force preemption: {load:?}");
        assert_eq!((load.running, load.waiting, load.kv_blocks_used), (0, 0, 0), "{load:?}");
    });
}

/// Images the coordinator cannot use are refused with the reason, before anything runs.
#[test]
fn mismatched_images_get_invalid_argument() {
    let model = tiny_fixture();
    let coordinator: Process = support::coordinator(utf8(&model), &[]);
    let wide = image("wide.png");
    let (prompt, _) = generated(&[&wide], 1);
    let rt = runtime();
    rt.block_on(async {
        let mut client =
            CoordinatorServiceClient::connect(format!("http://{}", coordinator.addr)).await.expect("connect");
        // One image too many for the prompt's placeholders.
        let err = client.generate(request("extra", &prompt, &[&wide, &wide], 2)).await.expect_err("two images");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("placeholder"), "{}", err.message());
        // Pixels that do not fill the tile grid.
        let mut short = request("short", &prompt, &[&wide], 2);
        short.images[0].pixels = short.images[0].pixels.slice(1..);
        let err = client.generate(short).await.expect_err("short pixels");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("images[0]"), "{}", err.message());
    });
}
