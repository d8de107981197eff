//! Quantization across processes: `epserve worker --quantize` quantizes only its own experts (its
//! `Status` reports the bytes they take, a fraction of bf16's) and computes exactly what the same
//! quantization in process computes; and the int8 expert exchange (`--wire-dtype int8`) stays as
//! close to the in-process run as int8 weights do.

mod support;

use std::time::Duration;

use epserve_coordinator::ExpertTransport;
use epserve_model::quant::quality::{Comparison, Quality};
use epserve_model::{Activations, ExpertBackend, LoadPolicy, QuantScheme, QuantScope, Quantize, WeightStorage};
use epserve_proto::v1::StatusRequest;
use epserve_proto::v1::expert_service_client::ExpertServiceClient;
use epserve_proto::wire::WireDtype;
use support::coordinator::{Coordinator, max_abs_diff};
use support::{Process, tiny_fixture, workers};

fn policy(scheme: Option<QuantScheme>) -> LoadPolicy {
    LoadPolicy {
        storage: WeightStorage::AsStored,
        quantize: scheme.map(|scheme| Quantize { scheme, scope: QuantScope::default() }),
        activations: Default::default(),
    }
}

/// Every position of every golden prompt, `reference` against `candidate`.
fn compare(coordinator: &Coordinator, reference: &dyn ExpertBackend, candidate: &dyn ExpertBackend) -> Quality {
    let mut comparison = Comparison::default();
    for prompt in support::golden_prompts() {
        let (r, c) = (coordinator.logits(reference, &prompt), coordinator.logits(candidate, &prompt));
        for (r, c) in r.expect("reference").iter().zip(&c.expect("candidate")) {
            comparison.add(r, c);
        }
    }
    comparison.finish()
}

fn grpc(coordinator: &Coordinator, workers: &[Process], wire: WireDtype) -> ExpertTransport {
    ExpertTransport::Grpc(coordinator.grpc(workers, wire, Duration::from_secs(20)).expect("connect"))
}

fn status(runtime: &tokio::runtime::Runtime, worker: &Process) -> epserve_proto::v1::StatusResponse {
    runtime.block_on(async {
        let mut client = ExpertServiceClient::connect(format!("http://{}", worker.addr)).await.expect("connect");
        client.status(StatusRequest {}).await.expect("status").into_inner()
    })
}

#[test]
fn quantized_workers_hold_a_fraction_of_bf16_and_compute_what_the_same_quantization_computes_in_process() {
    let coordinator = Coordinator::new();
    // Four of sixteen experts each, as stored (bf16), int8 and int4.
    let hosts = workers(
        &tiny_fixture(),
        &[
            &["--experts", "0-3"],
            &["--experts", "0-3", "--quantize", "int8"],
            &["--experts", "0-3", "--quantize", "int4"],
        ],
    );
    let [bf16, int8, int4] = [0, 1, 2].map(|i| status(&coordinator.runtime, &hosts[i]));
    assert_eq!(bf16.weight_format, "bf16");
    assert_eq!(int8.weight_format, "int8 (group 32, f16 scales)");
    assert_eq!(int4.weight_format, "int4 (group 32, f16 scales)");
    for s in [&bf16, &int8, &int4] {
        assert!(s.layers.iter().all(|l| l.experts == [0, 1, 2, 3]), "{s:?}");
    }
    let ratio = |s: &epserve_proto::v1::StatusResponse| s.resident_bytes as f64 / bf16.resident_bytes as f64;
    eprintln!(
        "resident expert bytes: bf16 {}, int8 {:.3}×, int4 {:.3}×",
        bf16.resident_bytes,
        ratio(&int8),
        ratio(&int4)
    );
    assert!(ratio(&int8) <= 0.55, "int8: {:.3} of bf16", ratio(&int8));
    assert!(ratio(&int4) <= 0.30, "int4: {:.3} of bf16", ratio(&int4));
    drop(hosts);

    // Two int4 workers serving every expert: over an f32 wire, the in-process int4 logits.
    let int4_workers = workers(
        &tiny_fixture(),
        &[&["--shard", "0/2", "--quantize", "int4"], &["--shard", "1/2", "--quantize", "int4"]],
    );
    let remote = grpc(&coordinator, &int4_workers, WireDtype::F32);
    let local = coordinator.local_with(policy(Some(QuantScheme::Int4)));
    for prompt in support::golden_prompts() {
        let (a, b) =
            (coordinator.logits(&local, &prompt).expect("local"), coordinator.logits(&remote, &prompt).expect("grpc"));
        let diff = max_abs_diff(&a, &b);
        assert!(diff <= 1e-5, "T={}: int4 workers differ from int4 in process by {diff}", prompt.len());
    }
    drop(int4_workers);

    // Workers told `--activations int8` multiply as the same mode does in process.
    let a8_workers = workers(
        &tiny_fixture(),
        &[
            &["--shard", "0/2", "--quantize", "int4", "--activations", "int8"],
            &["--shard", "1/2", "--quantize", "int4", "--activations", "int8"],
        ],
    );
    let remote = grpc(&coordinator, &a8_workers, WireDtype::F32);
    let local =
        coordinator.local_with(LoadPolicy { activations: Activations::Int8, ..policy(Some(QuantScheme::Int4)) });
    for prompt in support::golden_prompts() {
        let (a, b) =
            (coordinator.logits(&local, &prompt).expect("local"), coordinator.logits(&remote, &prompt).expect("grpc"));
        let diff = max_abs_diff(&a, &b);
        assert!(diff <= 1e-5, "T={}: int8-activation workers differ from the mode in process by {diff}", prompt.len());
    }
}

#[test]
fn int8_wire_stays_as_close_to_the_in_process_run_as_int8_weights() {
    let coordinator = Coordinator::new();
    let hosts = workers(&tiny_fixture(), &[&["--shard", "0/2"], &["--shard", "1/2"]]);
    let local = &coordinator.local;
    let mut figures = Vec::new();
    for wire in [WireDtype::Bf16, WireDtype::Int8] {
        let q = compare(&coordinator, local, &grpc(&coordinator, &hosts, wire));
        eprintln!(
            "{wire} wire: {} positions, top-1 agreement {:.3}, mean KL {:.5}, p99 KL {:.5}, max |Δlogit| {:.4}",
            q.positions, q.top1_agreement, q.mean_kl, q.p99_kl, q.max_abs_logit_diff
        );
        figures.push(q);
    }
    let int8_weights = compare(&coordinator, local, &coordinator.local_with(policy(Some(QuantScheme::Int8))));
    eprintln!("int8 weights: top-1 {:.3}, mean KL {:.5}", int8_weights.top1_agreement, int8_weights.mean_kl);
    let int8 = &figures[1];
    assert!(int8.positions > 60);
    assert!(int8.top1_agreement >= 0.97 && int8.mean_kl <= 0.01, "int8 wire: {int8:?}");
    // Each row keeps half a step of max|row|/127: the wire's bytes are about half of bf16's.
    let hidden = coordinator.config.text.hidden_size;
    let ratio = WireDtype::Int8.payload_bytes(1, hidden) as f64 / WireDtype::Bf16.payload_bytes(1, hidden) as f64;
    assert!(ratio <= 0.55, "{ratio}");
}

/// `epserve quality`: a model against itself quantized at load, and a pre-quantized checkpoint
/// against the bf16 one it was made from; a run with nothing to compare is refused.
#[test]
fn quality_command_compares_a_quantized_model_with_its_reference() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("prompts.jsonl");
    let lines: Vec<String> =
        support::golden_prompts().iter().map(|p| serde_json::json!({ "tokens": p }).to_string()).collect();
    std::fs::write(&file, lines.join("\n")).expect("write prompts");
    let positions: u64 = support::golden_prompts().iter().map(|p| p.len() as u64).sum();
    let (model, prompts) = (tiny_fixture(), file.to_str().expect("utf-8").to_owned());
    let model = model.to_str().expect("utf-8");

    let int8 = support::run_json(&["quality", "--model", model, "--quantize", "int8", "--prompts", &prompts]);
    let q = &int8["quality"];
    assert_eq!(q["positions"], positions);
    assert_eq!(int8["quantize"], "int8");
    assert_eq!(int8["quantize_scope"], "routed,shared");
    assert!(q["top1_agreement"].as_f64().expect("agreement") >= 0.97, "{int8}");
    assert!(q["mean_kl"].as_f64().expect("kl") <= 0.01, "{int8}");

    let w4a16 = epserve_testkit::fixtures::dir(epserve_testkit::fixtures::TINY_LLAMA4_W4A16);
    let w4a16 = w4a16.to_str().expect("utf-8");
    let pre = support::run_json(&["quality", "--model", w4a16, "--against", model, "--prompts", &prompts]);
    let (agreement, kl) = (pre["quality"]["top1_agreement"].as_f64(), pre["quality"]["mean_kl"].as_f64());
    eprintln!("W4A16 against bf16: top-1 {agreement:?}, mean KL {kl:?}");
    assert!(kl.expect("kl") > 1e-4, "a 4-bit checkpoint differs from its bf16 source: {pre}");
    assert!(agreement.expect("agreement") >= 0.5, "{pre}");

    // What int8 activations add on a pre-quantized checkpoint: it against itself with f32 ones.
    let a8 = support::run_json(&["quality", "--model", w4a16, "--activations", "int8", "--prompts", &prompts]);
    assert_eq!(a8["activations"], "int8");
    assert_eq!(a8["quality"]["positions"], positions);
    let kl = a8["quality"]["mean_kl"].as_f64().expect("kl");
    eprintln!("W4A16 with int8 activations against f32 ones: {}", a8["quality"]);
    assert!(kl < 0.3, "{a8}");

    let out = std::process::Command::new(support::epserve())
        .args(["quality", "--model", model, "--prompts", &prompts])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to compare"), "{out:?}");
}
