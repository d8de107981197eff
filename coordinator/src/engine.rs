//! The serving engine: an actor that owns the running batch, the paged KV cache and the model, on
//! its own thread (the forward pass blocks; it never runs on the async IO threads).
//!
//! Each step: drop cancelled requests, schedule decode tokens of the running sequences and chunks of
//! waiting prompts within a token budget (FCFS by priority then arrival), reserve KV blocks —
//! preempting the least urgent, youngest running sequence when the pool is short (it is recomputed
//! later, nothing is lost) — run one forward pass for all of them, sample, and stream the tokens back.
//! Priorities: interactive requests (0) are admitted before batch lines (higher values) and take
//! the place and KV of running batch sequences when the engine is full; batch work fills whatever
//! capacity is left (`engine/scheduling.rs`). Requests
//! with a grammar get their token masks computed on other threads during the forward pass
//! ([`crate::masks`]) and sample among the allowed tokens only.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::{Duration, Instant};

use epserve_grammar::{Advance, TokenConstraint, TokenMask};
use epserve_imaging::Tiles;
use epserve_model::{ExpertBackend, LogitsFor, Retry, SequenceStep, TextModel};
use epserve_proto::metric_names as m;
use parking_lot::Mutex;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::watch;

use crate::admission::QueueSlot;
pub use crate::admission::{EVENT_BUFFER, EventSender, SubmitError};
use crate::images::{ImageSpec, SequenceImages, Vision};
use crate::kv_pool::{KvPool, SeqBlocks};
use crate::masks::{MaskJob, MaskThreads};
use crate::sampling::{Sampled, Sampler, SamplingParams};

mod scheduling;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Tokens computed per step at most (decodes count one each; prompts are chunked to fit).
    pub max_batch_tokens: usize,
    /// Sequences in the running batch at most.
    pub max_running: usize,
    /// Longest sequence (prompt + output) a request may reach.
    pub max_model_len: usize,
    /// Split steps into two overlapped micro-batches.
    pub overlap: bool,
    /// The checkpoint's end-of-sequence ids, as `epserve_model::generation_config::eos_token_ids`
    /// reads them (the rule `epserve generate` follows too).
    pub eos_token_ids: Vec<u32>,
    /// Requests accepted and not yet started at most; past it `submit` answers [`SubmitError::Busy`].
    pub max_waiting: usize,
}

impl EngineConfig {
    /// Defaults (512-token steps, 256 running sequences, no overlap), with the checkpoint's EOS ids.
    pub fn new(max_model_len: usize, eos_token_ids: Vec<u32>) -> Self {
        EngineConfig {
            max_batch_tokens: 512,
            max_running: 256,
            max_model_len,
            overlap: false,
            eos_token_ids,
            max_waiting: 1024,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Request {
    pub id: String,
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    /// Lower runs first; FCFS among equals. 0 is interactive traffic, the most urgent class; batch
    /// jobs use higher values. Negative values are refused.
    pub priority: i32,
    /// The prompt's images in order: their features fill its `<|patch|>` placeholders exactly.
    pub images: Vec<Tiles>,
    /// A grammar the output must follow, compiled against this model's vocabulary.
    pub constraint: Option<TokenConstraint>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or EOS.
    Stop,
    /// `max_tokens` or the context limit.
    Length,
    /// The engine could not compute the request (e.g. the experts failed).
    Error,
    /// Some experts have no live host (after the transport waited for one): try again later.
    Unavailable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Token(Sampled),
    Finished { reason: FinishReason, usage: Usage, message: Option<String> },
}

/// What the gateway routes on, refreshed every step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Load {
    pub waiting: usize,
    pub running: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_total: usize,
    pub steps: u64,
    /// Sequences preempted (and recomputed) since start.
    pub preemptions: u64,
}

enum Command {
    /// A checked request, with the positions of its image placeholders and its queue place.
    Submit(Request, Vec<u32>, EventSender, QueueSlot),
    Cancel(String),
    Stop,
}

/// Cheap handle to the engine thread.
#[derive(Clone, Debug)]
pub struct EngineHandle {
    commands: Sender<Command>,
    load: Arc<Mutex<Load>>,
    /// Requests submitted and not yet running.
    queued: Arc<AtomicUsize>,
    max_waiting: usize,
    /// Why the engine thread died (a panic), once it has.
    died: watch::Receiver<Option<String>>,
    max_model_len: usize,
    vocab: usize,
    images: Option<ImageSpec>,
}

impl EngineHandle {
    /// Queues a request; its tokens arrive on `events`. Dropping the receiver cancels it, and so
    /// does leaving the channel full.
    pub fn submit(&self, request: Request, events: EventSender) -> Result<(), SubmitError> {
        request.sampling.validate().map_err(SubmitError::Invalid)?;
        if request.priority < 0 {
            return Err(SubmitError::Invalid(format!(
                "priority {} is negative; 0 is the most urgent class",
                request.priority
            )));
        }
        if request.prompt.is_empty() {
            return Err(SubmitError::Invalid("the prompt is empty".into()));
        }
        if let Some(bad) = request.prompt.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(SubmitError::Invalid(format!("token id {bad} is outside the vocabulary ({})", self.vocab)));
        }
        if request.prompt.len() >= self.max_model_len {
            return Err(SubmitError::TooLong { prompt: request.prompt.len(), limit: self.max_model_len });
        }
        let positions = ImageSpec::placeholders(self.images.as_ref(), &request.prompt, &request.images)
            .map_err(SubmitError::Invalid)?;
        if let Some(why) = self.died() {
            return Err(SubmitError::Died(why));
        }
        let slot = QueueSlot(self.queued.clone());
        let waiting = self.queued.fetch_add(1, Ordering::AcqRel);
        if waiting >= self.max_waiting {
            return Err(SubmitError::Busy { waiting });
        }
        self.commands.send(Command::Submit(request, positions, events, slot)).map_err(|_| SubmitError::Stopped)
    }

    /// Why the engine thread died, if it has (it panicked: nothing it held can be trusted).
    pub fn died(&self) -> Option<String> {
        self.died.borrow().clone()
    }

    /// Resolves when the engine thread has died, with why.
    pub async fn wait_died(&self) -> String {
        let mut died = self.died.clone();
        let why = died.wait_for(Option::is_some).await.map(|why| why.clone().unwrap_or_default());
        match why {
            Ok(why) => why,
            // The thread is gone without a word (its sender dropped): it stopped normally.
            Err(_) => std::future::pending().await,
        }
    }

    pub fn cancel(&self, id: &str) {
        let _ = self.commands.send(Command::Cancel(id.to_owned()));
    }

    pub fn load(&self) -> Load {
        self.load.lock().clone()
    }

    pub fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    /// What images must agree with; `None` when the model has no vision tower.
    pub fn image_spec(&self) -> Option<ImageSpec> {
        self.images
    }

    pub fn stop(&self) {
        let _ = self.commands.send(Command::Stop);
    }
}

struct Sequence {
    id: String,
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    blocks: SeqBlocks,
    /// The prompt's images, until the sequence finishes (a preempted one encodes them again).
    images: Option<SequenceImages>,
    sampler: Sampler,
    /// The grammar, at the end of the tokens generated so far (kept across preemption: the
    /// tokens are too). Taken out while a step computes its mask.
    constraint: Option<TokenConstraint>,
    events: EventSender,
    /// Held until the sequence first runs.
    queue_slot: Option<QueueSlot>,
    arrival: u64,
    priority: i32,
    submitted: Instant,
    last_token: Option<Instant>,
}

impl Sequence {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Tokens whose KV is not computed yet.
    fn pending(&self) -> usize {
        self.tokens.len() - self.blocks.len()
    }

    fn usage(&self) -> Usage {
        Usage { prompt_tokens: self.prompt_len as u32, completion_tokens: self.generated() as u32 }
    }
}

/// Starts the engine thread. `model`, `vision` (the vision tower of a multimodal checkpoint) and
/// `experts` move into it.
pub fn start<E: ExpertBackend + 'static>(
    model: TextModel,
    vision: Option<Vision>,
    experts: E,
    pool: KvPool,
    config: EngineConfig,
) -> EngineHandle {
    let (tx, rx) = channel();
    let load = Arc::new(Mutex::new(Load { kv_blocks_total: pool.total_blocks(), ..Default::default() }));
    let (died_tx, died) = watch::channel(None);
    let handle = EngineHandle {
        commands: tx,
        load: load.clone(),
        queued: Arc::new(AtomicUsize::new(0)),
        max_waiting: config.max_waiting,
        died,
        max_model_len: config.max_model_len,
        vocab: model.config().vocab_size,
        images: vision.as_ref().map(|v| v.spec),
    };
    std::thread::Builder::new()
        .name("epserve-engine".into())
        .spawn(move || {
            // A panic is a bug whose damage is unknown (the KV pool, half-sampled sequences): the
            // engine does not go on; the coordinator reports it, stops serving and exits, and its
            // supervisor starts a fresh one. Unwinding drops every request's sender, which ends
            // their streams.
            let ran = std::panic::catch_unwind(AssertUnwindSafe(move || {
                let mut engine = Engine {
                    model,
                    vision,
                    experts,
                    pool,
                    config,
                    waiting: VecDeque::new(),
                    running: Vec::new(),
                    arrivals: 0,
                    load,
                    steps: 0,
                    preemptions: 0,
                    failures: 0,
                    masks: MaskThreads::new(),
                };
                engine.run(rx);
            }));
            if let Err(panic) = ran {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".to_owned());
                tracing::error!("the engine thread panicked: {why}");
                metrics::counter!(m::ENGINE_DEATHS_TOTAL).increment(1);
                died_tx.send_replace(Some(format!("the engine thread panicked: {why}")));
            }
        })
        .map(|_| ())
        .unwrap_or_else(|e| tracing::error!("cannot start the engine thread: {e}"));
    handle
}

struct Engine<E> {
    model: TextModel,
    vision: Option<Vision>,
    experts: E,
    pool: KvPool,
    config: EngineConfig,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    arrivals: u64,
    load: Arc<Mutex<Load>>,
    steps: u64,
    preemptions: u64,
    /// Failed steps in a row.
    failures: u32,
    /// Compute constrained requests' token masks during the forward pass.
    masks: MaskThreads,
}

/// How many times in a row a step that failed transiently ([`Retry::Now`]) is retried (after 100,
/// 200, 400 ms) before its requests are ended with an error. Other failures end them at once.
pub const STEP_RETRIES: u32 = 3;

impl<E: ExpertBackend> Engine<E> {
    fn run(&mut self, commands: Receiver<Command>) {
        loop {
            // Block for work when idle; otherwise take what has arrived and step.
            let idle = self.waiting.is_empty() && self.running.is_empty();
            let first = if idle {
                match commands.recv() {
                    Ok(c) => Some(c),
                    Err(_) => return,
                }
            } else {
                match commands.recv_timeout(Duration::ZERO) {
                    Ok(c) => Some(c),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            };
            let mut next = first;
            while let Some(command) = next.take() {
                match command {
                    Command::Submit(request, positions, events, slot) => self.admit(request, positions, events, slot),
                    Command::Cancel(id) => self.cancel(&id),
                    Command::Stop => return,
                }
                next = commands.try_recv().ok();
            }
            self.step();
            self.publish_load();
        }
    }

    fn admit(&mut self, request: Request, positions: Vec<u32>, events: EventSender, slot: QueueSlot) {
        let max_len = (request.prompt.len() + request.sampling.max_tokens as usize).min(self.config.max_model_len);
        let needed = self.pool.blocks_for_sequence(max_len);
        if needed > self.pool.total_blocks() {
            let message = format!(
                "request {} needs {needed} KV blocks for {max_len} tokens; the cache has {}",
                request.id,
                self.pool.total_blocks()
            );
            let _ = events.try_send(Event::Finished {
                reason: FinishReason::Error,
                usage: Usage { prompt_tokens: request.prompt.len() as u32, completion_tokens: 0 },
                message: Some(message),
            });
            return;
        }
        self.arrivals += 1;
        let sampler = Sampler::new(request.sampling, &request.prompt);
        if let Some(c) = &request.constraint {
            metrics::counter!(m::CONSTRAINED_REQUESTS_TOTAL, "grammar" => c.kind().label()).increment(1);
        }
        let tokens_per_tile = self.vision.as_ref().map_or(0, |v| v.spec.tokens_per_tile);
        let seq = Sequence {
            id: request.id,
            prompt_len: request.prompt.len(),
            tokens: request.prompt,
            blocks: SeqBlocks::default(),
            images: SequenceImages::new(request.images, positions, tokens_per_tile),
            sampler,
            constraint: request.constraint,
            events,
            queue_slot: Some(slot),
            arrival: self.arrivals,
            priority: request.priority,
            submitted: Instant::now(),
            last_token: None,
        };
        // FCFS within a priority: insert after every waiting sequence that goes first.
        let at = self.waiting.iter().position(|w| (w.priority, w.arrival) > (seq.priority, seq.arrival));
        match at {
            Some(i) => self.waiting.insert(i, seq),
            None => self.waiting.push_back(seq),
        }
    }

    fn cancel(&mut self, id: &str) {
        let pool = &mut self.pool;
        for seq in self.running.iter_mut().chain(self.waiting.iter_mut()).filter(|s| s.id == id) {
            pool.release(&mut seq.blocks);
        }
        self.running.retain(|s| s.id != id);
        self.waiting.retain(|s| s.id != id);
    }

    /// Frees the blocks of requests whose client went away.
    fn drop_cancelled(&mut self) {
        let pool = &mut self.pool;
        self.running.retain_mut(|s| {
            let gone = s.events.is_closed();
            if gone {
                pool.release(&mut s.blocks);
            }
            !gone
        });
        self.waiting.retain(|s| !s.events.is_closed());
    }

    fn step(&mut self) {
        self.drop_cancelled();
        let plan = self.schedule();
        if plan.is_empty() {
            return;
        }
        let started = Instant::now();
        let jobs = self.mask_jobs(&plan);
        let in_flight = (!jobs.is_empty()).then(|| self.masks.start(jobs));
        let result = self.forward(&plan);
        let masks = in_flight.map(|f| self.masks.finish(f));
        let masks = self.restore_constraints(masks);
        self.steps += 1;
        self.finish_step(&plan, started, result, masks);
    }

    /// The forward pass of this step's plan: the logits of each scheduled sequence's last token.
    fn forward(&mut self, plan: &[(u64, usize)]) -> epserve_model::Result<Vec<Vec<f32>>> {
        self.encode_images(plan).and_then(|()| {
            let pool = &self.pool;
            let mut views: Vec<_> = Vec::with_capacity(plan.len());
            for seq in self.running.iter_mut() {
                if let Some(&(_, n)) = plan.iter().find(|(id, _)| *id == seq.arrival) {
                    let from = seq.blocks.len();
                    let images = match &seq.images {
                        Some(images) => images.rows(from..from + n)?,
                        None => None,
                    };
                    views.push((pool.view(&mut seq.blocks), from, n, &seq.tokens, images));
                }
            }
            let mut steps: Vec<SequenceStep<'_>> = views
                .iter_mut()
                .map(|(kv, from, n, tokens, images)| {
                    SequenceStep::new(&tokens[*from..*from + *n], kv).with_images(images.take())
                })
                .collect();
            let logits = crate::overlap::forward_step(
                &self.model,
                &mut steps,
                &self.experts,
                LogitsFor::Last,
                self.config.overlap,
                None,
            );
            logits.and_then(|l| Ok(l.to_vec2::<f32>()?))
        })
    }

    /// Takes the grammars of the sequences that sample this step (their chunk completes what they
    /// have pending) out of them, to compute their masks during the forward pass.
    fn mask_jobs(&mut self, plan: &[(u64, usize)]) -> Vec<MaskJob> {
        let mut jobs = Vec::new();
        for seq in &mut self.running {
            let samples = plan.iter().any(|&(id, n)| id == seq.arrival && n == seq.pending());
            if samples && let Some(constraint) = seq.constraint.take() {
                let budget = (seq.sampler.params().max_tokens as usize)
                    .saturating_sub(seq.generated())
                    .min(self.config.max_model_len.saturating_sub(seq.tokens.len()));
                jobs.push(MaskJob { sequence: seq.arrival, constraint, budget, mask: None });
            }
        }
        jobs
    }

    /// Puts the grammars back into their sequences and returns each one's mask, by arrival id. A
    /// sequence whose mask thread panicked has lost its grammar: it ends with an error.
    fn restore_constraints(
        &mut self,
        masks: Option<(Vec<MaskJob>, Vec<u64>)>,
    ) -> Vec<(u64, Result<TokenMask, String>)> {
        let Some((jobs, lost)) = masks else { return Vec::new() };
        let mut out = Vec::with_capacity(jobs.len() + lost.len());
        for job in jobs {
            if let Some(seq) = self.running.iter_mut().find(|s| s.arrival == job.sequence) {
                seq.constraint = Some(job.constraint);
            }
            let mask = job.mask.unwrap_or_else(|| Err(epserve_grammar::GrammarError::Failed("no mask".into())));
            out.push((job.sequence, mask.map_err(|e| e.to_string())));
        }
        for sequence in lost {
            tracing::error!(sequence, "a grammar mask thread panicked");
            out.push((sequence, Err("the grammar engine failed computing the token mask".into())));
        }
        out
    }

    fn finish_step(
        &mut self,
        plan: &[(u64, usize)],
        started: Instant,
        result: epserve_model::Result<Vec<Vec<f32>>>,
        masks: Vec<(u64, Result<TokenMask, String>)>,
    ) {
        let batch_tokens: usize = plan.iter().map(|p| p.1).sum();
        metrics::histogram!(m::ENGINE_STEP_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::histogram!(m::ENGINE_BATCH_TOKENS).record(batch_tokens as f64);
        let rows = match result {
            Ok(rows) => {
                self.failures = 0;
                self.experts.step_finished();
                rows
            }
            Err(e) => {
                // No cache was committed, so the step can simply run again: a worker that hiccups
                // costs latency, not requests. Only what may succeed at once is retried, and only
                // `STEP_RETRIES` times in a row; an invalid input or a bug gives the same error
                // every time, and without a live host the transport has already waited.
                self.failures += 1;
                metrics::counter!(m::ENGINE_STEP_FAILURES_TOTAL).increment(1);
                let retry = e.retry();
                if retry == Retry::Now && self.failures <= STEP_RETRIES {
                    let backoff = Duration::from_millis(100 << (self.failures - 1));
                    tracing::warn!(attempt = self.failures, "step failed, retrying in {backoff:?}: {e}");
                    std::thread::sleep(backoff);
                    return;
                }
                match retry {
                    Retry::Now => {
                        tracing::error!("step failed {} times in a row, failing its requests: {e}", self.failures)
                    }
                    Retry::AfterRecovery => {
                        tracing::error!("step failed without a live host, failing its requests: {e}")
                    }
                    Retry::Never => tracing::error!("step failed and would fail again, failing its requests: {e}"),
                }
                self.failures = 0;
                let reason =
                    if retry == Retry::AfterRecovery { FinishReason::Unavailable } else { FinishReason::Error };
                let message = e.to_string();
                let scheduled: Vec<u64> = plan.iter().map(|p| p.0).collect();
                let pool = &mut self.pool;
                self.running.retain_mut(|s| {
                    if !scheduled.contains(&s.arrival) {
                        return true;
                    }
                    pool.release(&mut s.blocks);
                    let _ =
                        s.events.try_send(Event::Finished { reason, usage: s.usage(), message: Some(message.clone()) });
                    false
                });
                return;
            }
        };

        let mut row = 0;
        let mut finished = Vec::new();
        for seq in self.running.iter_mut() {
            let Some(&(_, n)) = plan.iter().find(|(id, _)| *id == seq.arrival) else { continue };
            let logits = &rows[row];
            row += 1;
            if let Some(images) = &mut seq.images {
                images.release_before(seq.blocks.len());
            }
            // Tokens of a prompt (or of a recomputed sequence) count as prefill; one new token as decode.
            let decode = n == 1 && seq.generated() > 0 && seq.pending() == 0;
            let counter = if decode { m::ENGINE_DECODE_TOKENS_TOTAL } else { m::ENGINE_PREFILL_TOKENS_TOTAL };
            metrics::counter!(counter).increment(n as u64);
            if seq.pending() > 0 {
                // A chunk of a long prompt: no token yet.
                continue;
            }
            let mask = match masks.iter().position(|(id, _)| *id == seq.arrival) {
                Some(i) => match &masks[i].1 {
                    Ok(mask) => Some(mask),
                    Err(error) => {
                        let message = format!("constrained decoding: {error}");
                        let _ = seq.events.try_send(Event::Finished {
                            reason: FinishReason::Error,
                            usage: seq.usage(),
                            message: Some(message),
                        });
                        finished.push(seq.arrival);
                        continue;
                    }
                },
                None => None,
            };
            let sampled = seq.sampler.sample_masked(logits, mask);
            let token = sampled.token;
            seq.tokens.push(token);
            let now = Instant::now();
            match seq.last_token {
                None => metrics::histogram!(m::TIME_TO_FIRST_TOKEN_SECONDS).record((now - seq.submitted).as_secs_f64()),
                Some(t) => metrics::histogram!(m::INTER_TOKEN_LATENCY_SECONDS).record((now - t).as_secs_f64()),
            }
            seq.last_token = Some(now);
            if let Err(TrySendError::Full(_)) = seq.events.try_send(Event::Token(sampled)) {
                // The reader has stopped reading: its request is cancelled, its KV freed.
                tracing::warn!(request = %seq.id, "cancelled: its reader left {} events unread", seq.events.max_capacity());
                metrics::counter!(m::ENGINE_STALLED_READERS_TOTAL).increment(1);
                finished.push(seq.arrival);
                continue;
            }
            let eos = &self.config.eos_token_ids;
            // A grammar allows an end-of-sequence id only once it is complete: that ends the
            // request even under `ignore_eos`. Any other token moves the grammar on.
            let grammar = match &mut seq.constraint {
                Some(_) if eos.contains(&token) => Ok(Advance::Complete),
                Some(constraint) => constraint.advance(token),
                None => Ok(Advance::Continue),
            };
            let complete = match grammar {
                Ok(advance) => advance == Advance::Complete,
                Err(error) => {
                    let message = Some(format!("constrained decoding: {error}"));
                    let _ = seq.events.try_send(Event::Finished {
                        reason: FinishReason::Error,
                        usage: seq.usage(),
                        message,
                    });
                    finished.push(seq.arrival);
                    continue;
                }
            };
            // A document closed because the budget ran short is a shortened answer.
            let shortened = seq.constraint.as_ref().is_some_and(|c| c.closed_for_budget());
            let reason = if complete && shortened {
                Some(FinishReason::Length)
            } else if complete || seq.sampler.stops_at(token, eos) {
                Some(FinishReason::Stop)
            } else if seq.generated() >= seq.sampler.params().max_tokens as usize
                || seq.tokens.len() >= self.config.max_model_len
            {
                Some(FinishReason::Length)
            } else {
                None
            };
            if let Some(reason) = reason {
                let _ = seq.events.try_send(Event::Finished { reason, usage: seq.usage(), message: None });
                finished.push(seq.arrival);
            }
        }
        let pool = &mut self.pool;
        self.running.retain_mut(|s| {
            if finished.contains(&s.arrival) {
                pool.release(&mut s.blocks);
                false
            } else {
                pool.trim(&mut s.blocks);
                true
            }
        });
    }

    /// Encodes, in one batch, every image that this step's chunks reach and that has no features.
    fn encode_images(&mut self, plan: &[(u64, usize)]) -> epserve_model::Result<()> {
        let Some(vision) = &self.vision else { return Ok(()) };
        let mut wanted = Vec::new();
        for (s, seq) in self.running.iter().enumerate() {
            let (Some(images), Some(&(_, n))) = (&seq.images, plan.iter().find(|(id, _)| *id == seq.arrival)) else {
                continue;
            };
            let from = seq.blocks.len();
            wanted.extend(images.missing(from..from + n).into_iter().map(|i| (s, i)));
        }
        if wanted.is_empty() {
            return Ok(());
        }
        let tiles: Vec<&Tiles> =
            wanted.iter().filter_map(|&(s, i)| self.running[s].images.as_ref().map(|images| images.tiles(i))).collect();
        let features = vision.encode(&tiles)?;
        for ((s, i), f) in wanted.into_iter().zip(features) {
            if let Some(images) = &mut self.running[s].images {
                images.set_features(i, f);
            }
        }
        Ok(())
    }

    fn publish_load(&self) {
        let load = Load {
            waiting: self.waiting.len(),
            running: self.running.len(),
            kv_blocks_used: self.pool.used_blocks(),
            kv_blocks_total: self.pool.total_blocks(),
            steps: self.steps,
            preemptions: self.preemptions,
        };
        metrics::gauge!(m::ENGINE_WAITING_REQUESTS).set(load.waiting as f64);
        metrics::gauge!(m::ENGINE_RUNNING_REQUESTS).set(load.running as f64);
        metrics::gauge!(m::KV_BLOCKS_USED).set(load.kv_blocks_used as f64);
        metrics::gauge!(m::KV_BLOCKS_TOTAL).set(load.kv_blocks_total as f64);
        *self.load.lock() = load;
    }
}
