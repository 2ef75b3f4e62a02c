//! One sequence's generation, as steps: reuse the cached prefix, prefill the rest (in
//! chunks when the caller asks), then sample and decode token by token, streaming text
//! that is always whole UTF-8.
//!
//! A [`Generator`] is a slot: a runner plus the token ids its state holds (for prefix
//! reuse). [`Generator::start`] begins a [`Sequence`] on it; each step the caller takes
//! the step's input ([`Generator::batch_item`]), runs it (alone, or with other slots'
//! items through a [`BatchStepper`]), then calls [`Generator::advance`], which samples and
//! emits text. [`Generator::generate`] runs the whole loop for one caller (`caldera run`).

use std::time::{Duration, Instant};

use caldera_model::{BatchItem, BatchStepper, RunError, Runner, SerialStepper, StepOutcome};
use caldera_tokenizer::{StreamDecoder, Tokenizer};

use crate::sampler::{Sampler, SamplerConfig, StopMatcher};

#[derive(Clone, Debug)]
pub struct GenParams {
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    pub stop: Vec<String>,
    /// Report special (control) tokens as [`Piece::Special`] instead of dropping them
    /// (tool-call parsers that look for `<|channel|>`, `<|tool_call_start|>`, ...).
    pub specials: bool,
}

impl GenParams {
    pub fn new(max_tokens: usize, sampler: SamplerConfig, stop: Vec<String>) -> GenParams {
        GenParams {
            max_tokens,
            sampler,
            stop,
            specials: false,
        }
    }
}

/// What generation produces, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    /// Whole UTF-8 text (stop strings already applied).
    Text(&'a str),
    /// The text of a special token, only with [`GenParams::specials`].
    Special(&'a str),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token (EOS, end of turn).
    Eog,
    /// A stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The session's context is full.
    Context,
}

#[derive(Clone, Debug)]
pub struct GenStats {
    pub prompt_tokens: usize,
    /// Prompt tokens served from the cache instead of being computed.
    pub reused_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
    pub finish: FinishReason,
}

impl GenStats {
    pub fn prefill_tps(&self) -> f64 {
        (self.prompt_tokens - self.reused_tokens) as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }

    /// Decode speed over the tokens produced by decode steps (the first token comes from
    /// the prefill's logits).
    pub fn decode_tps(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

/// One request in progress on a [`Generator`].
pub struct Sequence<'t> {
    tok: &'t Tokenizer,
    prompt: Vec<u32>,
    params: GenParams,
    /// Prompt tokens in the runner's state (reused + prefilled so far).
    fed: usize,
    reused: usize,
    /// The sampled token the next decode step runs.
    next: u32,
    generated: usize,
    sampler: Sampler,
    stops: StopMatcher,
    dec: StreamDecoder<'t>,
    started: Instant,
    prefill_time: Duration,
    decode_start: Option<Instant>,
}

impl Sequence<'_> {
    pub fn prompt_tokens(&self) -> usize {
        self.prompt.len()
    }

    /// Prompt tokens taken from the slot's cache.
    pub fn reused_tokens(&self) -> usize {
        self.reused
    }

    pub fn generated_tokens(&self) -> usize {
        self.generated
    }

    /// Whether prompt tokens remain to be run.
    pub fn prefilling(&self) -> bool {
        self.fed < self.prompt.len()
    }

    /// Prompt tokens not yet run.
    pub fn prefill_left(&self) -> usize {
        self.prompt.len() - self.fed
    }

    /// Decode speed so far (tokens per second over the decode steps).
    pub fn decode_tps(&self) -> f64 {
        match self.decode_start {
            Some(t) if self.generated > 1 => {
                (self.generated - 1) as f64 / t.elapsed().as_secs_f64().max(1e-9)
            }
            _ => 0.0,
        }
    }

    fn stats(&self, finish: FinishReason) -> GenStats {
        GenStats {
            prompt_tokens: self.prompt.len(),
            reused_tokens: self.reused,
            generated_tokens: self.generated,
            prefill_time: self.prefill_time,
            decode_time: self.decode_start.map_or(Duration::ZERO, |t| t.elapsed()),
            finish,
        }
    }
}

/// A sequence on a backend: its runner and the token ids its state holds.
pub struct Generator {
    runner: Box<dyn Runner>,
    cached: Vec<u32>,
    logits: Vec<f32>,
    /// The last step's argmax where the backend found it on the device (greedy
    /// sequences: [`Sampler::plain_greedy`]); else the row is in `logits`.
    argmax: Option<u32>,
}

impl Generator {
    pub fn new(runner: Box<dyn Runner>) -> Generator {
        Generator {
            runner,
            cached: Vec::new(),
            logits: Vec::new(),
            argmax: None,
        }
    }

    pub fn context_size(&self) -> usize {
        self.runner.capacity()
    }

    /// Tokens the runner's state holds.
    pub fn context_used(&self) -> usize {
        self.runner.len()
    }

    pub fn describe(&self) -> String {
        self.runner.describe()
    }

    /// KV pages of the backend's shared pool the sequence holds (`None`: the runner has
    /// its own cache).
    pub fn kv_pages(&self) -> Option<usize> {
        self.runner.kv_pages()
    }

    /// Whether the backend keeps computed prefixes in a cache shared by its runners.
    pub fn shares_prefixes(&self) -> bool {
        self.runner.shares_prefixes()
    }

    /// How many leading tokens of `prompt` the cache holds.
    pub fn common_prefix(&self, prompt: &[u32]) -> usize {
        self.cached
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count()
    }

    /// Forgets the cached tokens (after a failed step, whose effect on the state is
    /// unknown). False when the runner cannot even restart its sequence.
    pub fn reset(&mut self) -> bool {
        self.cached.clear();
        self.runner.truncate(0)
    }

    /// Begins generating after `prompt` (non-empty): keeps the longest common prefix of
    /// the cache (always recomputing the last prompt token, whose logits pick the first
    /// new token) and leaves the rest to the prefill steps.
    pub fn start<'t>(
        &mut self,
        tok: &'t Tokenizer,
        prompt: Vec<u32>,
        params: GenParams,
    ) -> Result<Sequence<'t>, RunError> {
        if prompt.is_empty() {
            return Err("the prompt is empty".into());
        }
        let common = self.common_prefix(&prompt);
        let mut reuse = common.min(prompt.len() - 1);
        if !self.runner.truncate(reuse) {
            // Recurrent state cannot rewind: start the sequence over.
            reuse = 0;
            if !self.runner.truncate(0) {
                return Err("the backend cannot reset this sequence".into());
            }
        }
        self.cached.truncate(reuse);
        // The backend's shared prefix cache may hold more of the prompt (pages of earlier
        // requests on any slot); the last prompt token always runs.
        let held = self.runner.reuse_prefix(&prompt, prompt.len() - 1);
        if held > reuse && held < prompt.len() {
            self.cached.extend_from_slice(&prompt[reuse..held]);
            reuse = held;
        } else if held != reuse {
            // Not a state this generator can describe: start over.
            reuse = 0;
            self.cached.clear();
            if !self.runner.truncate(0) {
                return Err("the backend cannot reset this sequence".into());
            }
        }
        let mut sampler = Sampler::new(params.sampler.clone());
        for &t in &prompt {
            sampler.accept(t);
        }
        let stops = StopMatcher::new(params.stop.clone());
        Ok(Sequence {
            tok,
            prompt,
            params,
            fed: reuse,
            reused: reuse,
            next: 0,
            generated: 0,
            sampler,
            stops,
            dec: StreamDecoder::new(tok, true),
            started: Instant::now(),
            prefill_time: Duration::ZERO,
            decode_start: None,
        })
    }

    /// This step's input for `seq`: up to `prefill_budget` prompt tokens while it
    /// prefills (`None` when the budget is 0), else its sampled token.
    pub fn batch_item<'a>(
        &'a mut self,
        seq: &'a Sequence<'_>,
        prefill_budget: usize,
    ) -> Option<BatchItem<'a>> {
        let tokens = if seq.prefilling() {
            let n = seq.prefill_left().min(prefill_budget);
            if n == 0 {
                return None;
            }
            &seq.prompt[seq.fed..seq.fed + n]
        } else {
            std::slice::from_ref(&seq.next)
        };
        self.argmax = None;
        let greedy = seq.sampler.plain_greedy();
        Some(BatchItem {
            runner: &mut *self.runner,
            tokens,
            logits: &mut self.logits,
            argmax: greedy.then_some(&mut self.argmax),
            outcome: StepOutcome::Pending,
        })
    }

    /// Takes a step that ran `ran` tokens of `seq` (its [`Generator::batch_item`]) and
    /// succeeded: records them, and once the prompt is in, samples the next token and
    /// passes its text to `on_piece`. Returns the statistics when the sequence ended.
    pub fn advance(
        &mut self,
        seq: &mut Sequence<'_>,
        ran: usize,
        mut on_piece: impl FnMut(Piece<'_>),
    ) -> Option<GenStats> {
        if seq.prefilling() {
            let n = ran.min(seq.prefill_left());
            self.cached
                .extend_from_slice(&seq.prompt[seq.fed..seq.fed + n]);
            seq.fed += n;
            if seq.prefilling() {
                return None;
            }
            seq.prefill_time = seq.started.elapsed();
            seq.decode_start = Some(Instant::now());
            // The whole prompt is in: a state later requests may start from.
            self.runner.checkpoint();
        } else {
            self.cached.push(seq.next);
        }
        let finish = self.sample(seq, &mut on_piece)?;
        if finish != FinishReason::Stop {
            let rest = seq.dec.flush();
            let (emit, _) = seq.stops.push(&rest);
            let tail = seq.stops.flush();
            for s in [emit, tail] {
                if !s.is_empty() {
                    on_piece(Piece::Text(&s));
                }
            }
        }
        Some(seq.stats(finish))
    }

    /// Samples one token from the logits; `Some` when the sequence ends here.
    fn sample(
        &mut self,
        seq: &mut Sequence<'_>,
        on_piece: &mut impl FnMut(Piece<'_>),
    ) -> Option<FinishReason> {
        if seq.generated >= seq.params.max_tokens {
            return Some(FinishReason::Length);
        }
        let next = match self.argmax.take() {
            // Found on the device for a greedy sequence: what `sample` would pick.
            Some(id) => id,
            None => seq.sampler.sample(&mut self.logits),
        };
        seq.sampler.accept(next);
        seq.generated += 1;
        let tok = seq.tok;
        if tok.is_eog(next) {
            return Some(FinishReason::Eog);
        }
        if seq.params.specials && tok.is_special(next) {
            if let Some(text) = tok.token_text(next) {
                on_piece(Piece::Special(text));
            }
        }
        let piece = seq.dec.push(next);
        let (emit, hit) = seq.stops.push(&piece);
        if !emit.is_empty() {
            on_piece(Piece::Text(&emit));
        }
        if hit {
            return Some(FinishReason::Stop);
        }
        if seq.generated >= seq.params.max_tokens {
            return Some(FinishReason::Length);
        }
        if self.runner.len() + 1 > self.runner.capacity() {
            return Some(FinishReason::Context);
        }
        seq.next = next;
        None
    }

    /// Generates after `prompt`, calling `on_text` with each piece of text as it becomes
    /// whole. The cache keeps the longest common prefix of the previous call's tokens.
    pub fn generate(
        &mut self,
        tok: &Tokenizer,
        prompt: &[u32],
        params: &GenParams,
        mut on_text: impl FnMut(&str),
    ) -> Result<GenStats, RunError> {
        let mut seq = self.start(tok, prompt.to_vec(), params.clone())?;
        loop {
            let Some(mut item) = self.batch_item(&seq, usize::MAX) else {
                return Err("nothing to run".into());
            };
            let ran = item.tokens.len();
            SerialStepper.step_batch(std::slice::from_mut(&mut item));
            match std::mem::replace(&mut item.outcome, StepOutcome::Pending) {
                StepOutcome::Done => {}
                StepOutcome::Failed(e) => return Err(e),
                StepOutcome::Panicked(m) => return Err(format!("the backend panicked: {m}").into()),
                StepOutcome::Pending => return Err("the step did not run".into()),
            }
            drop(item);
            let done = self.advance(&mut seq, ran, |p| {
                if let Piece::Text(t) = p {
                    on_text(t)
                }
            });
            if let Some(stats) = done {
                return Ok(stats);
            }
        }
    }
}
