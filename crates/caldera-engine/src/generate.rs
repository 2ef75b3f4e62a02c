//! One sequence's generation loop: reuse the cached prefix, prefill the rest, then
//! sample and decode token by token, streaming text that is always whole UTF-8.

use std::time::{Duration, Instant};

use caldera_model::{Logits, RunError, Runner};
use caldera_tokenizer::{StreamDecoder, Tokenizer};

use crate::sampler::{Sampler, SamplerConfig, StopMatcher};

#[derive(Clone, Debug)]
pub struct GenParams {
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    pub stop: Vec<String>,
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

/// A sequence on a backend: its runner and the token ids its state holds.
pub struct Generator {
    runner: Box<dyn Runner>,
    cached: Vec<u32>,
    logits: Vec<f32>,
}

impl Generator {
    pub fn new(runner: Box<dyn Runner>) -> Generator {
        Generator {
            runner,
            cached: Vec::new(),
            logits: Vec::new(),
        }
    }

    pub fn context_size(&self) -> usize {
        self.runner.capacity()
    }

    pub fn describe(&self) -> String {
        self.runner.describe()
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
        let common = self
            .cached
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        // Always recompute at least the last prompt token: its logits pick the first token.
        let mut reuse = common.min(prompt.len().saturating_sub(1));
        if !self.runner.truncate(reuse) {
            // Recurrent state cannot rewind: start the sequence over.
            reuse = 0;
            if !self.runner.truncate(0) {
                return Err("the backend cannot reset this sequence".into());
            }
        }
        self.cached.truncate(reuse);

        let t0 = Instant::now();
        self.runner
            .forward(&prompt[reuse..], Logits::Last, &mut self.logits)?;
        self.cached.extend_from_slice(&prompt[reuse..]);
        let prefill_time = t0.elapsed();

        let mut sampler = Sampler::new(params.sampler.clone());
        for &t in prompt {
            sampler.accept(t);
        }
        let mut stops = StopMatcher::new(params.stop.clone());
        let mut dec = StreamDecoder::new(tok, true);
        let mut generated = 0usize;
        let t1 = Instant::now();
        let finish = loop {
            if generated >= params.max_tokens {
                break FinishReason::Length;
            }
            let next = sampler.sample(&mut self.logits);
            sampler.accept(next);
            generated += 1;
            if tok.is_eog(next) {
                break FinishReason::Eog;
            }
            let piece = dec.push(next);
            let (emit, hit) = stops.push(&piece);
            if !emit.is_empty() {
                on_text(&emit);
            }
            if hit {
                break FinishReason::Stop;
            }
            if generated >= params.max_tokens {
                break FinishReason::Length;
            }
            if self.runner.len() + 1 > self.runner.capacity() {
                break FinishReason::Context;
            }
            self.runner
                .forward(&[next], Logits::Last, &mut self.logits)?;
            self.cached.push(next);
        };
        if finish != FinishReason::Stop {
            let rest = dec.flush();
            let (emit, _) = stops.push(&rest);
            let tail = stops.flush();
            for s in [emit, tail] {
                if !s.is_empty() {
                    on_text(&s);
                }
            }
        }
        Ok(GenStats {
            prompt_tokens: prompt.len(),
            reused_tokens: reuse,
            generated_tokens: generated,
            prefill_time,
            decode_time: t1.elapsed(),
            finish,
        })
    }
}
