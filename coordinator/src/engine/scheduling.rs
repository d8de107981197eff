//! What each step computes: decode tokens of the running sequences and chunks of waiting prompts
//! within the token budget, KV blocks reserved for them, and preemption (the least urgent, youngest
//! running sequence goes back to the queue, to be recomputed) when the running slots or the KV pool
//! are short.

use epserve_model::ExpertBackend;
use epserve_proto::metric_names as m;

use super::{Engine, Sequence};

impl<E: ExpertBackend> Engine<E> {
    /// Decides this step's work: `(sequence arrival id, tokens to compute)`, with KV reserved.
    /// While a more urgent request waits, less urgent running sequences compute no prompt chunk
    /// (their decode tokens still run), and admitting it may preempt them.
    pub(super) fn schedule(&mut self) -> Vec<(u64, usize)> {
        let mut budget = self.config.max_batch_tokens;
        let mut plan: Vec<(u64, usize)> = Vec::new();
        // Most urgent and oldest first, so that preemption takes from the least urgent, youngest.
        self.running.sort_by_key(|s| (s.priority, s.arrival));
        let urgent_waiting = self.waiting.front().map(|w| w.priority);
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let seq = &self.running[i];
            let n = seq.pending().min(budget);
            if n == 0 || (n > 1 && urgent_waiting.is_some_and(|p| p < seq.priority)) {
                i += 1;
                continue;
            }
            if self.reserve_or_preempt(i, n) {
                budget = budget.saturating_sub(n + self.encoding_cost(&self.running[i], n));
                plan.push((self.running[i].arrival, n));
                i += 1;
            }
            // Otherwise sequence i (the youngest) was preempted itself; the loop ends at len.
        }
        // Admit waiting prompts while the budget, the running slots and the cache allow; a more
        // urgent one may take the slot and the blocks of less urgent running sequences.
        'admit: while budget > 0 {
            let Some(priority) = self.waiting.front().map(|w| w.priority) else { break };
            if self.running.len() >= self.config.max_running
                && !self.preempt_less_urgent(priority, &mut plan, &mut budget)
            {
                break;
            }
            let n = self.waiting[0].pending().min(budget);
            while !self.pool.reserve(&mut self.waiting[0].blocks, n) {
                if !self.preempt_less_urgent(priority, &mut plan, &mut budget) {
                    break 'admit;
                }
            }
            let Some(mut seq) = self.waiting.pop_front() else { break };
            seq.queue_slot = None;
            plan.push((seq.arrival, n));
            budget = budget.saturating_sub(n + self.encoding_cost(&seq, n));
            self.running.push(seq);
        }
        plan
    }

    /// Preempts the least urgent, youngest running sequence if it is less urgent than `priority`,
    /// taking it out of this step's `plan` (its budget comes back). False when there is none.
    pub(super) fn preempt_less_urgent(
        &mut self,
        priority: i32,
        plan: &mut Vec<(u64, usize)>,
        budget: &mut usize,
    ) -> bool {
        let victim = self.running.iter().enumerate().max_by_key(|(_, s)| (s.priority, s.arrival)).map(|(i, _)| i);
        let Some(victim) = victim.filter(|&v| self.running[v].priority > priority) else { return false };
        if let Some(p) = plan.iter().position(|(id, _)| *id == self.running[victim].arrival) {
            *budget += plan.remove(p).1;
        }
        self.preempt(victim);
        true
    }

    /// Takes running sequence `i` out (its blocks freed) and back into the waiting queue, in its
    /// priority's order: it is recomputed when it runs again.
    pub(super) fn preempt(&mut self, i: usize) {
        let mut victim = self.running.remove(i);
        tracing::debug!(request = %victim.id, priority = victim.priority, "preempting, will recompute");
        metrics::counter!(m::ENGINE_PREEMPTIONS_TOTAL).increment(1);
        self.preemptions += 1;
        self.pool.release(&mut victim.blocks);
        let at = self.waiting.iter().position(|w| (w.priority, w.arrival) > (victim.priority, victim.arrival));
        match at {
            Some(p) => self.waiting.insert(p, victim),
            None => self.waiting.push_back(victim),
        }
    }

    /// The budget the vision encoder takes when `seq` computes its next `n` tokens: the tiles of
    /// the images whose placeholders those tokens reach first, each at its cost in text tokens.
    pub(super) fn encoding_cost(&self, seq: &Sequence, n: usize) -> usize {
        match (&seq.images, &self.vision) {
            (Some(images), Some(vision)) => {
                let from = seq.blocks.len();
                images.tiles_missing(from..from + n) * vision.spec.tile_cost_tokens
            }
            _ => 0,
        }
    }

    /// Reserves `n` tokens for running sequence `i`, preempting the least urgent, youngest running
    /// sequences (the last ones: `running` is sorted) until it fits. False when `i` itself had to go.
    pub(super) fn reserve_or_preempt(&mut self, i: usize, n: usize) -> bool {
        loop {
            if self.pool.reserve(&mut self.running[i].blocks, n) {
                return true;
            }
            let youngest = self.running.len() - 1;
            self.preempt(youngest);
            if youngest == i {
                return false;
            }
        }
    }
}
