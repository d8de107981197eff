//! Priorities in the engine (issue 18): interactive requests (priority 0) are admitted before batch
//! lines (higher values) and take the running slot of a batch sequence when the engine is full —
//! the batch sequence is preempted and recomputed later, and still ends with all its tokens — while
//! requests of one class wait their turn and preempt nobody.

mod support;

use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use epserve_coordinator::engine::{self, EngineConfig, EngineHandle, Event, FinishReason, Request};
use epserve_coordinator::kv_pool::{KvCapacity, KvPool};
use epserve_coordinator::sampling::SamplingParams;
use support::prompt;
use tokio::sync::mpsc::Receiver;
use tokio::sync::mpsc::error::TryRecvError;

const BATCH: i32 = 10;

fn start(max_running: usize) -> EngineHandle {
    let (cfg, model, experts) = support::load_tiny();
    let pool = KvPool::new(&cfg.text, KvCapacity::Tokens(8192), 4, DType::F32, &Device::Cpu).expect("pool");
    let config = EngineConfig { max_running, ..EngineConfig::new(2048, cfg.text.eos_token_ids.clone()) };
    engine::start(model, None, experts, pool, config)
}

fn submit(engine: &EngineHandle, id: &str, max_tokens: u32, priority: i32) -> Receiver<Event> {
    let sampling = SamplingParams { temperature: 0.0, max_tokens, ignore_eos: true, ..Default::default() };
    let request = Request {
        id: id.into(),
        prompt: prompt(8, id.len()),
        sampling,
        priority,
        images: Vec::new(),
        constraint: None,
    };
    let (tx, rx) = tokio::sync::mpsc::channel(8192);
    engine.submit(request, tx).expect("queued");
    rx
}

/// Waits for the first token of `rx`.
fn started(rx: &mut Receiver<Event>) {
    assert!(matches!(rx.blocking_recv(), Some(Event::Token(_))), "the request runs");
}

/// Reads `rx` to its end: the tokens the request generated (its usage) and the finish reason.
fn finish(rx: &mut Receiver<Event>) -> (u32, FinishReason) {
    loop {
        match rx.blocking_recv() {
            Some(Event::Token(_)) => {}
            Some(Event::Finished { reason, usage, .. }) => return (usage.completion_tokens, reason),
            None => panic!("the stream ended without a finish"),
        }
    }
}

/// Whether `rx` has finished already, reading what it has buffered.
fn has_finished(rx: &mut Receiver<Event>) -> bool {
    loop {
        match rx.try_recv() {
            Ok(Event::Token(_)) => continue,
            Ok(Event::Finished { .. }) | Err(TryRecvError::Disconnected) => return true,
            Err(TryRecvError::Empty) => return false,
        }
    }
}

#[test]
fn an_interactive_request_takes_the_slot_of_a_batch_sequence() {
    let engine = start(2);
    // Two long batch sequences fill both running slots.
    let mut a = submit(&engine, "batch-a", 1500, BATCH);
    let mut b = submit(&engine, "batch-bb", 1500, BATCH);
    started(&mut a);
    started(&mut b);
    let interactive_started = Instant::now();
    let mut interactive = submit(&engine, "interactive", 4, 0);
    assert_eq!(finish(&mut interactive), (4, FinishReason::Length));
    let waited = interactive_started.elapsed();
    // Not after a batch sequence ended: one was preempted to make room.
    assert!(!has_finished(&mut a) && !has_finished(&mut b), "the interactive request waited for a batch line");
    assert!(engine.load().preemptions >= 1, "a batch sequence was preempted: {:?}", engine.load());
    // The preempted sequence is recomputed and ends with all its tokens.
    let (ta, ra) = finish(&mut a);
    let (tb, rb) = finish(&mut b);
    assert_eq!([(ta, ra), (tb, rb)], [(1500, FinishReason::Length); 2]);
    eprintln!("interactive request done in {waited:?} with two batch sequences running");
}

#[test]
fn requests_of_one_class_wait_and_preempt_nobody() {
    let engine = start(2);
    let mut a = submit(&engine, "a", 1500, 0);
    let mut b = submit(&engine, "bb", 1500, 0);
    started(&mut a);
    started(&mut b);
    let mut c = submit(&engine, "ccc", 4, 0);
    std::thread::sleep(Duration::from_millis(300));
    assert!(matches!(c.try_recv(), Err(TryRecvError::Empty)), "the third request waits for a slot");
    assert_eq!(engine.load().preemptions, 0);
    assert_eq!(engine.load().waiting, 1);
    // A batch line behind it waits too, and runs after it.
    let mut d = submit(&engine, "dddd", 4, BATCH);
    drop(a);
    assert_eq!(finish(&mut c), (4, FinishReason::Length));
    assert_eq!(finish(&mut d), (4, FinishReason::Length));
    assert_eq!(engine.load().preemptions, 0, "nobody was preempted");
    drop(b);
}
