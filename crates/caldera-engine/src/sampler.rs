//! Token sampling from a logits row, and stop-string matching over streamed text.
//!
//! [`Sampler::sample`] runs, in order:
//! 1. penalties over the last `repeat_last_n` accepted tokens (prompt included):
//!    repetition (a positive logit is divided by `repeat_penalty`, a negative one
//!    multiplied), presence (`presence_penalty` subtracted once per distinct token) and
//!    frequency (`frequency_penalty × count` subtracted);
//! 2. greedy argmax when `temperature == 0` or `top_k == 1`; otherwise
//! 3. logits divided by `temperature`, then the top-k, top-p (nucleus) and min-p cuts,
//!    then one draw from the softmax of what is left.
//!
//! top-p and min-p both keep a prefix of the candidates sorted by probability, and
//! min-p's threshold (`min_p × p_max`) does not change under renormalization, so the two
//! cuts commute; min-p runs first because it needs no sort.
//!
//! NaN logits count as −∞ and never win; +∞ counts as the largest finite value. A row
//! with no finite logit at all yields token 0.

use std::collections::VecDeque;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The largest penalty window accepted by [`SamplerConfig::validate`].
pub const MAX_REPEAT_LAST_N: usize = 1 << 20;

/// Sampling parameters. The "off" value of each cut is noted beside it.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerConfig {
    /// 0 = greedy. Finite, ≥ 0.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; 0 = off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability sums to ≥ `top_p`;
    /// in (0, 1], 1 = off.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p × p_max`; in [0, 1], 0 = off.
    pub min_p: f32,
    /// Repetition penalty; > 0, 1 = off.
    pub repeat_penalty: f32,
    /// How many of the last accepted tokens the three penalties look at; 0 = no
    /// penalties. At most [`MAX_REPEAT_LAST_N`].
    pub repeat_last_n: usize,
    /// Subtracted once from each token seen in the window; in [−2, 2], 0 = off.
    pub presence_penalty: f32,
    /// Subtracted per occurrence in the window; in [−2, 2], 0 = off.
    pub frequency_penalty: f32,
    /// `None` seeds from the OS.
    pub seed: Option<u64>,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}

impl SamplerConfig {
    /// Argmax, no penalties.
    pub fn greedy() -> Self {
        SamplerConfig {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }

    /// Checks every field against the range documented on it; the message names the
    /// field and the value.
    pub fn validate(&self) -> Result<(), String> {
        fn check(name: &str, v: f32, ok: bool, range: &str) -> Result<(), String> {
            if v.is_finite() && ok {
                Ok(())
            } else {
                Err(format!("{name} must be {range}, got {v}"))
            }
        }
        check(
            "temperature",
            self.temperature,
            self.temperature >= 0.0,
            "a finite number >= 0",
        )?;
        check(
            "top_p",
            self.top_p,
            self.top_p > 0.0 && self.top_p <= 1.0,
            "in (0, 1]",
        )?;
        check(
            "min_p",
            self.min_p,
            (0.0..=1.0).contains(&self.min_p),
            "in [0, 1]",
        )?;
        check(
            "repeat_penalty",
            self.repeat_penalty,
            self.repeat_penalty > 0.0,
            "a finite number > 0",
        )?;
        check(
            "presence_penalty",
            self.presence_penalty,
            (-2.0..=2.0).contains(&self.presence_penalty),
            "in [-2, 2]",
        )?;
        check(
            "frequency_penalty",
            self.frequency_penalty,
            (-2.0..=2.0).contains(&self.frequency_penalty),
            "in [-2, 2]",
        )?;
        if self.repeat_last_n > MAX_REPEAT_LAST_N {
            return Err(format!(
                "repeat_last_n must be at most {MAX_REPEAT_LAST_N}, got {}",
                self.repeat_last_n
            ));
        }
        Ok(())
    }

    fn penalties_on(&self) -> bool {
        self.repeat_last_n > 0
            && (self.repeat_penalty != 1.0
                || self.presence_penalty != 0.0
                || self.frequency_penalty != 0.0)
    }
}

/// A sampler for one sequence: its configuration, its random state and the window of
/// recent tokens the penalties look at. Scratch buffers are kept between calls, so
/// [`Sampler::sample`] does not allocate once they have grown to the vocabulary size.
pub struct Sampler {
    cfg: SamplerConfig,
    rng: StdRng,
    /// The last `min(repeat_last_n, accepted)` tokens, oldest first.
    recent: VecDeque<u32>,
    /// Sorted copy of `recent` (penalties).
    sorted: Vec<u32>,
    /// (scaled logit, token id) of the surviving candidates.
    cands: Vec<(f32, u32)>,
}

impl Sampler {
    /// The configuration is used as given; call [`SamplerConfig::validate`] first on
    /// anything a user supplied.
    pub fn new(cfg: SamplerConfig) -> Self {
        let rng = match cfg.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_entropy(),
        };
        let window = cfg.repeat_last_n.min(MAX_REPEAT_LAST_N);
        Sampler {
            rng,
            recent: VecDeque::with_capacity(window),
            sorted: Vec::with_capacity(window),
            cands: Vec::new(),
            cfg,
        }
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// Records a token (prompt or generated) for the penalties.
    pub fn accept(&mut self, token: u32) {
        let window = self.cfg.repeat_last_n.min(MAX_REPEAT_LAST_N);
        if window == 0 {
            return;
        }
        if self.recent.len() == window {
            self.recent.pop_front();
        }
        self.recent.push_back(token);
    }

    /// Forgets the accepted tokens (the random state is kept).
    pub fn reset(&mut self) {
        self.recent.clear();
    }

    /// Whether [`Self::sample`] is the plain argmax of the row (greedy, no penalties):
    /// then a backend may find it on the device and hand back only the id.
    pub fn plain_greedy(&self) -> bool {
        let temp = self.cfg.temperature;
        !self.cfg.penalties_on() && (!(temp.is_finite() && temp > 0.0) || self.cfg.top_k == 1)
    }

    /// Picks the next token from `logits` (one per vocabulary entry). `logits` is
    /// modified: penalties are applied in place. An empty row yields 0.
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        if self.cfg.penalties_on() {
            self.apply_penalties(logits);
        }
        let temp = self.cfg.temperature;
        if !(temp.is_finite() && temp > 0.0) || self.cfg.top_k == 1 {
            return argmax(logits);
        }

        // Scaled, sanitized candidates; −∞ (and NaN) can never be drawn.
        self.cands.clear();
        let inv_t = 1.0 / temp;
        for (i, &l) in logits.iter().enumerate() {
            let s = sanitize(l) * inv_t;
            if s > f32::NEG_INFINITY {
                self.cands.push((s.min(f32::MAX), i as u32));
            }
        }
        if self.cands.is_empty() {
            return argmax(logits);
        }

        let k = self.cfg.top_k;
        if k > 0 && k < self.cands.len() {
            self.cands.select_nth_unstable_by(k - 1, by_logit_desc);
            self.cands.truncate(k);
        }

        let max = self
            .cands
            .iter()
            .fold(f32::NEG_INFINITY, |m, &(l, _)| m.max(l));

        // min-p: p_i / p_max = exp(l_i − l_max) ≥ min_p.
        if self.cfg.min_p > 0.0 {
            let floor = max + self.cfg.min_p.ln();
            self.cands.retain(|&(l, _)| l >= floor);
        }

        // Weights relative to the max; the max itself has weight 1, so the sum is ≥ 1.
        for c in self.cands.iter_mut() {
            c.0 = (c.0 - max).exp();
        }

        if self.cfg.top_p < 1.0 {
            // Only the head of the descending order matters: sort the largest
            // TOP_P_HEAD weights first and the whole list only when they do not reach
            // the target (the order is total, so the head is the full sort's head).
            let total: f64 = self.cands.iter().map(|c| c.0 as f64).sum();
            let target = self.cfg.top_p as f64 * total;
            if self.cands.len() > TOP_P_HEAD {
                self.cands
                    .select_nth_unstable_by(TOP_P_HEAD - 1, by_logit_desc);
                let head: f64 = self.cands[..TOP_P_HEAD].iter().map(|c| c.0 as f64).sum();
                if head >= target {
                    self.cands.truncate(TOP_P_HEAD);
                }
            }
            self.cands.sort_unstable_by(by_logit_desc);
            let mut cum = 0.0f64;
            let mut keep = self.cands.len();
            for (i, c) in self.cands.iter().enumerate() {
                cum += c.0 as f64;
                if cum >= target {
                    keep = i + 1;
                    break;
                }
            }
            self.cands.truncate(keep.max(1));
        }

        let total: f64 = self.cands.iter().map(|c| c.0 as f64).sum();
        let mut u = self.rng.gen::<f64>() * total;
        for &(w, id) in &self.cands {
            u -= w as f64;
            if u < 0.0 {
                return id;
            }
        }
        // Rounding left u ≥ 0 after the last weight: take the last candidate.
        self.cands.last().map_or(0, |c| c.1)
    }

    fn apply_penalties(&mut self, logits: &mut [f32]) {
        self.sorted.clear();
        self.sorted.extend(self.recent.iter().copied());
        self.sorted.sort_unstable();
        let (rp, pres, freq) = (
            self.cfg.repeat_penalty,
            self.cfg.presence_penalty,
            self.cfg.frequency_penalty,
        );
        let mut i = 0;
        while i < self.sorted.len() {
            let tok = self.sorted[i];
            let mut j = i + 1;
            while j < self.sorted.len() && self.sorted[j] == tok {
                j += 1;
            }
            let count = (j - i) as f32;
            i = j;
            let Some(l) = logits.get_mut(tok as usize) else {
                continue;
            };
            if *l > 0.0 {
                *l /= rp;
            } else {
                *l *= rp;
            }
            *l -= pres + count * freq;
        }
    }
}

/// Candidates `top_p` sorts before it considers sorting them all.
const TOP_P_HEAD: usize = 1024;

/// NaN → −∞, +∞ → the largest finite value.
fn sanitize(l: f32) -> f32 {
    if l.is_nan() {
        f32::NEG_INFINITY
    } else {
        l.min(f32::MAX)
    }
}

/// Descending by value, ties by ascending id (a total, deterministic order).
fn by_logit_desc(a: &(f32, u32), b: &(f32, u32)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// The index of the first largest logit, NaN ignored; 0 when there is none.
///
/// Two passes a compiler vectorizes (a vocabulary row of 150k+ logits is read per slot
/// and token, so this is on the serving path): the largest value over 16 lanes, then the
/// first index holding it.
pub fn argmax(logits: &[f32]) -> u32 {
    const LANES: usize = 16;
    let mut lane_max = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &l) in lane_max.iter_mut().zip(c) {
            // NaN compares false: it never replaces a lane's value.
            if l > *m {
                *m = l;
            }
        }
    }
    let mut max = f32::NEG_INFINITY;
    for &l in lane_max.iter().chain(tail) {
        if l > max {
            max = l;
        }
    }
    if max == f32::NEG_INFINITY {
        // Every logit is -inf or NaN: the first that is not NaN, else 0.
        return logits.iter().position(|l| !l.is_nan()).unwrap_or(0) as u32;
    }
    logits.iter().position(|&l| l == max).unwrap_or(0) as u32
}

/// Holds back streamed text that may be the start of a stop string.
///
/// Invariants: `pending` is a suffix of the text pushed so far, never contains a whole
/// stop string, and is shorter than the longest stop string. Once a stop string has
/// been seen the matcher is finished and emits nothing more.
#[derive(Clone, Debug)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
    done: bool,
}

impl StopMatcher {
    /// Empty stop strings are ignored.
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
            done: false,
        }
    }

    /// Adds a piece of generated text. Returns the text safe to emit now and whether a
    /// stop string was completed; on a stop, the text before the earliest stop string
    /// is returned and the stop string and anything after it are dropped.
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        if self.done {
            return (String::new(), true);
        }
        self.pending.push_str(piece);

        let earliest = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(pos) = earliest {
            self.pending.truncate(pos);
            self.done = true;
            return (std::mem::take(&mut self.pending), true);
        }

        // Keep the longest suffix that is a proper prefix of some stop string. Suffixes
        // start at char boundaries: a stop string never starts with a continuation byte.
        let hold_from = self
            .pending
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.pending[i..];
                self.stops
                    .iter()
                    .any(|s| s.len() > tail.len() && s.starts_with(tail))
            })
            .unwrap_or(self.pending.len());
        let held = self.pending.split_off(hold_from);
        let out = std::mem::replace(&mut self.pending, held);
        (out, false)
    }

    /// Releases the held-back text at the end of generation (nothing after a stop).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Whether a stop string has been seen.
    pub fn stopped(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(temperature: f32, top_k: usize, top_p: f32, min_p: f32, seed: u64) -> SamplerConfig {
        SamplerConfig {
            temperature,
            top_k,
            top_p,
            min_p,
            seed: Some(seed),
            ..SamplerConfig::greedy()
        }
    }

    fn softmax(l: &[f32], t: f32) -> Vec<f64> {
        let m = l.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let e: Vec<f64> = l.iter().map(|&x| (((x - m) / t) as f64).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|x| x / s).collect()
    }

    fn histogram(s: &mut Sampler, logits: &[f32], n: usize) -> Vec<f64> {
        let mut h = vec![0usize; logits.len()];
        let mut buf = logits.to_vec();
        for _ in 0..n {
            buf.copy_from_slice(logits);
            h[s.sample(&mut buf) as usize] += 1;
        }
        h.iter().map(|&c| c as f64 / n as f64).collect()
    }

    const L: [f32; 6] = [1.0, 2.5, 0.3, -1.0, 2.2, 0.0];

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplerConfig::greedy());
        assert_eq!(s.sample(&mut L.clone()), 1);
        assert_eq!(s.sample(&mut [3.0, 3.0, 1.0]), 0, "first of ties");
        assert_eq!(s.sample(&mut [-5.0, -2.0, -9.0]), 1);
        assert_eq!(s.sample(&mut []), 0);
    }

    #[test]
    fn nan_and_inf_never_panic() {
        for c in [
            SamplerConfig::greedy(),
            cfg(1.0, 0, 1.0, 0.0, 1),
            cfg(0.7, 3, 0.5, 0.1, 2),
        ] {
            let mut s = Sampler::new(c);
            assert_eq!(s.sample(&mut [f32::NAN, 1.0, f32::NAN]), 1);
            let all_nan = s.sample(&mut [f32::NAN; 4]);
            assert!(all_nan < 4);
            assert_eq!(
                s.sample(&mut [f32::NEG_INFINITY, f32::INFINITY, 3.0, f32::NAN]),
                1
            );
            let t = s.sample(&mut [f32::NEG_INFINITY; 3]);
            assert!(t < 3);
        }
        // Extreme finite values and a tiny temperature do not overflow into NaN.
        let mut s = Sampler::new(cfg(1e-6, 0, 1.0, 0.0, 3));
        assert_eq!(s.sample(&mut [f32::MAX, -f32::MAX, 0.0, 1.0]), 0);
    }

    #[test]
    fn seed_reproduces() {
        let run = |seed| {
            let mut s = Sampler::new(cfg(1.0, 0, 1.0, 0.0, seed));
            (0..64)
                .map(|_| s.sample(&mut L.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_one_is_greedy() {
        for t in [0.1, 1.0, 5.0, 100.0] {
            let mut s = Sampler::new(cfg(t, 1, 1.0, 0.0, 11));
            for _ in 0..50 {
                assert_eq!(s.sample(&mut L.clone()), 1);
            }
        }
    }

    #[test]
    fn tiny_top_p_keeps_only_the_max() {
        let mut s = Sampler::new(cfg(2.0, 0, 1e-6, 0.0, 5));
        for _ in 0..200 {
            assert_eq!(s.sample(&mut L.clone()), 1);
        }
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // At T=1, p(1)≈0.45, p(4)≈0.33: top_p 0.7 keeps exactly {1, 4}.
        let p = softmax(&L, 1.0);
        assert!(p[1] < 0.7 && p[1] + p[4] >= 0.7);
        let mut s = Sampler::new(cfg(1.0, 0, 0.7, 0.0, 9));
        let h = histogram(&mut s, &L, 20_000);
        let z = p[1] + p[4];
        assert!((h[1] - p[1] / z).abs() < 0.015, "{h:?}");
        assert!((h[4] - p[4] / z).abs() < 0.015, "{h:?}");
        assert_eq!(h[1] + h[4], 1.0);
    }

    /// The reference: first index of the largest non-NaN value.
    fn argmax_naive(v: &[f32]) -> u32 {
        let mut best: Option<usize> = None;
        for (i, &l) in v.iter().enumerate() {
            if !l.is_nan() && best.is_none_or(|b| l > v[b]) {
                best = Some(i);
            }
        }
        best.unwrap_or(0) as u32
    }

    #[test]
    fn argmax_matches_a_plain_scan() {
        let mut rng = StdRng::seed_from_u64(17);
        for n in [0usize, 1, 5, 15, 16, 17, 33, 1000, 151_937] {
            for case in 0..6 {
                let mut v: Vec<f32> = (0..n).map(|_| rng.gen_range(-8.0f32..8.0)).collect();
                if n > 0 {
                    match case {
                        1 => v.iter_mut().step_by(3).for_each(|x| *x = f32::NAN),
                        2 => v.fill(f32::NEG_INFINITY),
                        3 => v.fill(f32::NAN),
                        4 => {
                            // Ties: the first wins, wherever the lanes put them.
                            let i = rng.gen_range(0..n);
                            let j = rng.gen_range(0..n);
                            v[i] = 100.0;
                            v[j] = 100.0;
                        }
                        5 => v[n - 1] = f32::INFINITY,
                        _ => {}
                    }
                }
                assert_eq!(argmax(&v), argmax_naive(&v), "n {n} case {case}");
            }
        }
    }

    #[test]
    fn top_p_over_a_large_vocabulary_keeps_the_sorted_nucleus() {
        // Peaked rows (the nucleus fits the sorted head) and flat rows (it does not):
        // the drawn token is always inside the nucleus a full sort defines.
        let mut rng = StdRng::seed_from_u64(5);
        for (spread, top_p) in [(12.0f32, 0.9f32), (0.01, 0.9), (3.0, 0.5), (0.5, 0.99)] {
            let n = 20_000;
            let l: Vec<f32> = (0..n).map(|_| rng.gen_range(0.0..spread)).collect();
            let mut idx: Vec<(f32, u32)> =
                l.iter().enumerate().map(|(i, &v)| (v, i as u32)).collect();
            idx.sort_unstable_by(by_logit_desc);
            let max = idx[0].0;
            let w: Vec<f64> = idx.iter().map(|c| ((c.0 - max) as f64).exp()).collect();
            let total: f64 = w.iter().sum();
            let mut cum = 0.0;
            let mut keep = n;
            for (i, x) in w.iter().enumerate() {
                cum += x;
                if cum >= top_p as f64 * total {
                    keep = i + 1;
                    break;
                }
            }
            let nucleus: std::collections::HashSet<u32> = idx[..keep].iter().map(|c| c.1).collect();
            let head: std::collections::HashSet<u32> =
                idx[..TOP_P_HEAD.min(keep)].iter().map(|c| c.1).collect();
            let mut s = Sampler::new(cfg(1.0, 0, top_p, 0.0, 21));
            let mut past_head = 0;
            for _ in 0..200 {
                let t = s.sample(&mut l.clone());
                assert!(
                    nucleus.contains(&t),
                    "spread {spread}: {t} outside the nucleus of {keep}"
                );
                past_head += usize::from(!head.contains(&t));
            }
            // A nucleus larger than the sorted head is drawn from beyond it too.
            if keep > 4 * TOP_P_HEAD {
                assert!(
                    past_head > 100,
                    "spread {spread}: {past_head} of 200 past the head"
                );
            }
        }
    }

    #[test]
    fn min_p_cuts() {
        // p_i / p_max = exp(l_i − 2.5): 0.74 for token 4, 0.22 for token 0, <0.11 else.
        let mut s = Sampler::new(cfg(1.0, 0, 1.0, 0.2, 3));
        let h = histogram(&mut s, &L, 5_000);
        assert!(h[0] > 0.0 && h[1] > 0.0 && h[4] > 0.0);
        assert_eq!(h[2] + h[3] + h[5], 0.0);
        let mut s = Sampler::new(cfg(1.0, 0, 1.0, 0.5, 3));
        let h = histogram(&mut s, &L, 5_000);
        assert_eq!(h[1] + h[4], 1.0);
    }

    #[test]
    fn top_k_limits_the_support() {
        let mut s = Sampler::new(cfg(1.0, 3, 1.0, 0.0, 4));
        let h = histogram(&mut s, &L, 20_000);
        let p = softmax(&[L[0], L[1], L[4]], 1.0);
        assert_eq!(h[2] + h[3] + h[5], 0.0);
        for (hi, pi) in [h[0], h[1], h[4]].iter().zip(&p) {
            assert!((hi - pi).abs() < 0.015, "{h:?} vs {p:?}");
        }
    }

    #[test]
    fn matches_softmax_at_temperature() {
        for (t, seed) in [(1.0f32, 21u64), (0.6, 22), (2.0, 23)] {
            let mut s = Sampler::new(cfg(t, 0, 1.0, 0.0, seed));
            let h = histogram(&mut s, &L, 20_000);
            let p = softmax(&L, t);
            for (hi, pi) in h.iter().zip(&p) {
                // 4.5 standard deviations of a binomial proportion over 20k draws.
                let tol = 4.5 * (pi * (1.0 - pi) / 20_000.0).sqrt() + 1e-3;
                assert!((hi - pi).abs() < tol, "T={t}: {h:?} vs {p:?}");
            }
        }
    }

    #[test]
    fn repetition_penalty() {
        let mut c = SamplerConfig::greedy();
        c.repeat_penalty = 2.0;
        c.repeat_last_n = 2;
        let mut s = Sampler::new(c);
        let mut l = vec![4.0, 3.0, -1.0, -1.5];
        s.accept(0);
        s.accept(2);
        assert_eq!(s.sample(&mut l), 1);
        assert_eq!(l, vec![2.0, 3.0, -2.0, -1.5]);
        // Token 0 leaves the window of 2.
        s.accept(3);
        s.accept(3);
        let mut l = vec![4.0, 3.0, -1.0, -1.5];
        assert_eq!(s.sample(&mut l), 0);
        assert_eq!(l, vec![4.0, 3.0, -1.0, -3.0]);
        // Out-of-vocabulary history is ignored.
        s.accept(u32::MAX);
        assert_eq!(s.sample(&mut [1.0, 0.0]), 0);
    }

    #[test]
    fn presence_and_frequency_penalties() {
        let mut c = SamplerConfig::greedy();
        c.repeat_last_n = 64;
        c.presence_penalty = 0.5;
        c.frequency_penalty = 0.25;
        let mut s = Sampler::new(c);
        for t in [0, 0, 0, 1] {
            s.accept(t);
        }
        let mut l = vec![2.0, 1.5, 1.0];
        // Token 0: 2 − 0.5 − 3×0.25 = 0.75; token 1: 1.5 − 0.5 − 0.25 = 0.75; token 2: 1.
        assert_eq!(s.sample(&mut l), 2);
        assert_eq!(l, vec![0.75, 0.75, 1.0]);
        s.reset();
        assert_eq!(s.sample(&mut [2.0, 1.5, 1.0]), 0);
        // repeat_last_n = 0 disables every penalty.
        let mut c = s.config().clone();
        c.repeat_last_n = 0;
        let mut s = Sampler::new(c);
        s.accept(0);
        assert_eq!(s.sample(&mut [2.0, 1.5, 1.0]), 0);
    }

    #[test]
    fn validate_ranges() {
        assert!(SamplerConfig::default().validate().is_ok());
        assert!(SamplerConfig::greedy().validate().is_ok());
        let bad = [
            SamplerConfig {
                temperature: f32::NAN,
                ..Default::default()
            },
            SamplerConfig {
                temperature: -0.1,
                ..Default::default()
            },
            SamplerConfig {
                temperature: f32::INFINITY,
                ..Default::default()
            },
            SamplerConfig {
                top_p: 0.0,
                ..Default::default()
            },
            SamplerConfig {
                top_p: 1.01,
                ..Default::default()
            },
            SamplerConfig {
                top_p: f32::NAN,
                ..Default::default()
            },
            SamplerConfig {
                min_p: -0.01,
                ..Default::default()
            },
            SamplerConfig {
                min_p: 1.5,
                ..Default::default()
            },
            SamplerConfig {
                repeat_penalty: 0.0,
                ..Default::default()
            },
            SamplerConfig {
                repeat_penalty: f32::NAN,
                ..Default::default()
            },
            SamplerConfig {
                presence_penalty: 2.5,
                ..Default::default()
            },
            SamplerConfig {
                frequency_penalty: f32::NEG_INFINITY,
                ..Default::default()
            },
            SamplerConfig {
                repeat_last_n: MAX_REPEAT_LAST_N + 1,
                ..Default::default()
            },
        ];
        for c in bad {
            assert!(c.validate().is_err(), "{c:?}");
        }
    }

    #[test]
    fn defaults() {
        let d = SamplerConfig::default();
        assert_eq!(
            (d.temperature, d.top_k, d.top_p, d.min_p),
            (0.8, 40, 0.95, 0.05)
        );
        assert_eq!((d.repeat_penalty, d.repeat_last_n), (1.0, 64));
        assert_eq!(
            (d.presence_penalty, d.frequency_penalty, d.seed),
            (0.0, 0.0, None)
        );
        // Default sampling over a large row works and stays in range.
        let mut s = Sampler::new(SamplerConfig::default());
        let mut row: Vec<f32> = (0..50_000)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
            .collect();
        let t = s.sample(&mut row);
        assert!((t as usize) < row.len());
    }

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool, String) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        let mut hit = false;
        for p in pieces {
            let (t, h) = m.push(p);
            out.push(t);
            hit |= h;
        }
        let rest = m.flush();
        (out, hit, rest)
    }

    #[test]
    fn stop_split_across_pieces() {
        let (out, hit, rest) = run(&["</s>"], &["Hello <", "/", "s> ignored"]);
        assert_eq!(out, ["Hello ", "", ""]);
        assert!(hit);
        assert_eq!(rest, "");

        let (out, hit, _) = run(&["STOP"], &["a", "ST", "x", "S", "TO", "P!", "more"]);
        assert_eq!(out.concat(), "aSTx");
        assert_eq!(out, ["a", "", "STx", "", "", "", ""]);
        assert!(hit);
    }

    #[test]
    fn stop_false_start_is_released() {
        let (out, hit, rest) = run(&["\n\nUser:"], &["one\n", "\n", "Use", "d it"]);
        assert!(!hit);
        assert_eq!(out.concat() + &rest, "one\n\nUsed it");
        assert_eq!(out.last().unwrap(), "\n\nUsed it");
        // Held text at the end of generation comes out of flush.
        let (out, hit, rest) = run(&["abc"], &["xxab"]);
        assert_eq!(
            (out.concat(), hit, rest.as_str()),
            ("xx".into(), false, "ab")
        );
    }

    #[test]
    fn overlapping_stops() {
        // Self-overlapping prefix: "aab" inside "aaab".
        let (out, hit, _) = run(&["aab"], &["a", "a", "a", "b", "c"]);
        assert_eq!(out.concat(), "a");
        assert!(hit);
        // The earliest stop wins; two stops sharing a prefix.
        let (out, hit, _) = run(&["bcd", "cx"], &["ab", "c", "x"]);
        assert_eq!(out.concat(), "ab");
        assert!(hit);
        let (out, hit, _) = run(&["bcd", "abce"], &["abc", "d"]);
        assert_eq!(out.concat(), "a");
        assert!(hit);
        // Both in one piece: the earlier one is cut at.
        let (out, _, _) = run(&["zz", "y"], &["12y3zz"]);
        assert_eq!(out, ["12"]);
        // Nothing is emitted after a stop.
        let mut m = StopMatcher::new(vec!["x".into()]);
        assert_eq!(m.push("axb"), ("a".into(), true));
        assert_eq!(m.push("more"), (String::new(), true));
        assert!(m.stopped());
        assert_eq!(m.flush(), "");
    }

    #[test]
    fn unicode_stops() {
        let (out, hit, _) = run(&["終わり"], &["これで", "終", "わ", "り。"]);
        assert_eq!(out.concat(), "これで");
        assert!(hit);
        let (out, hit, rest) = run(&["éé"], &["café", "!", "é"]);
        assert_eq!(out.concat() + &rest, "café!é");
        assert!(!hit);
        assert_eq!(out, ["caf", "é!", ""]);
        let (out, hit, _) = run(&["🛑"], &["go 🚀", "🛑 no"]);
        assert_eq!((out.concat(), hit), ("go 🚀".into(), true));
    }

    #[test]
    fn no_or_empty_stops_pass_everything() {
        let (out, hit, rest) = run(&[], &["a", "b"]);
        assert_eq!((out.concat(), hit, rest.as_str()), ("ab".into(), false, ""));
        let (out, hit, _) = run(&[""], &["a", "b"]);
        assert_eq!((out.concat(), hit), ("ab".into(), false));
    }
}
