//! The command line itself: every subcommand is reachable and documents itself, and arguments that
//! cannot work are refused before anything starts, with a message that names them.

use std::process::Command;

fn epserve(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_epserve")).args(args).env("EPSERVE_LOG", "warn").output().expect("run epserve")
}

#[test]
fn every_subcommand_has_help() {
    let out = epserve(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    let commands = [
        "up",
        "gateway",
        "coordinator",
        "worker",
        "logits",
        "generate",
        "gen-model",
        "bench",
        "decode-bench",
        "engine-bench",
        "exchange-bench",
        "vision-bench",
    ];
    for command in commands {
        assert!(help.contains(command), "`epserve --help` does not list `{command}`:\n{help}");
        let out = epserve(&[command, "--help"]);
        assert!(out.status.success(), "`epserve {command} --help` failed");
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage: epserve"), "`epserve {command} --help`");
    }
}

#[test]
fn arguments_that_cannot_work_are_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_dir = dir.path().join("m");
    let out_dir = out_dir.to_str().expect("utf-8");
    let cases: [(&[&str], &str); 4] = [
        (&["gen-model", "--preset", "huge", "--out", out_dir], "huge"),
        (&["worker", "--model", out_dir, "--shard", "1/4", "--experts", "0-3"], "--experts"),
        (&["generate", "--model", out_dir, "--tokens", "1,2", "--temperature=-1"], "--temperature"),
        (&["vision-bench", "--tiles", "0"], "--tiles"),
    ];
    for (args, named) in cases {
        let out = epserve(args);
        assert!(!out.status.success(), "epserve {args:?} succeeded");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(named), "epserve {args:?}: the error does not name `{named}`:\n{stderr}");
    }
}

/// `vision-bench` on the tiny fixture's tower (its `--config`): one pass, the JSON report with
/// every figure (no timing is asserted, only that the figures are there and make sense).
#[test]
fn vision_bench_reports_its_figures() {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny-llama4/config.json");
    let out = epserve(&["vision-bench", "--config", config, "--layers", "1", "--tiles", "2", "--iterations", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    for key in ["tiles_per_s", "ms_per_layer_per_tile", "gflops_layers", "matmul_peak_gflops", "fraction_of_peak"] {
        let value = report[key].as_f64().unwrap_or(f64::NAN);
        assert!(value.is_finite() && value > 0.0, "{key} = {value} in {report}");
    }
    assert_eq!((report["layers"].as_u64(), report["tiles"].as_u64()), (Some(1), Some(2)));
}
