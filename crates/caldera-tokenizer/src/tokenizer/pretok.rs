//! Normalization and pre-tokenization: the text rewrites and the splitting into words that
//! happen before BPE merges, for the GGUF pre-tokenizer names and tokenizer.json.

use std::borrow::Cow;
use std::ops::Range;

use fancy_regex::Regex;
use regex_automata::{meta, Input};
use unicode_normalization::UnicodeNormalization;

use super::TokenizerError;

/// GPT-2's split: contractions, letters, digits, other symbols, whitespace.
pub(crate) const GPT2: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3: case-insensitive contractions, digits in runs of up to three.
pub(crate) const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2: as Llama 3 but single digits.
pub(crate) const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen3.5: as Qwen2 with combining marks kept inside words.
pub(crate) const QWEN35: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// GPT-4o / o200k.
pub(crate) const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How the pieces around a split pattern's matches are kept (tokenizer.json `behavior`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Behavior {
    Isolated,
    Removed,
    MergedWithPrevious,
    MergedWithNext,
    Contiguous,
}

/// A split pattern. Regexes run on `regex-automata` (linear time) where they can; the
/// common tail `\s+(?!\S)|\s+` is run as `\s+` and the match shortened afterwards (see
/// [`compile`]). Only other look-arounds fall back to the backtracking `fancy-regex`.
#[derive(Debug)]
pub(crate) enum Pattern {
    Fast {
        re: Box<meta::Regex>,
        /// The pattern ended in `\s+(?!\S)|\s+`, compiled as `\s+`.
        ws_lookahead: bool,
        /// The pattern has a `\s*[\r\n]+` alternative before that tail.
        newline_alt: bool,
    },
    Fancy(Regex),
    Literal(String),
}

#[derive(Debug)]
pub(crate) enum PreStep {
    Split {
        pattern: Pattern,
        behavior: Behavior,
    },
}

/// Splits (normalized) text into words; each step refines the pieces of the one before.
#[derive(Debug, Default)]
pub(crate) struct PreTokenizer {
    pub steps: Vec<PreStep>,
}

/// Whether a prefix is added at the very start only or before every text span.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PrependScheme {
    Always,
    First,
}

/// Text rewrites applied to each plain-text span before splitting.
#[derive(Clone, Debug)]
pub(crate) enum NormOp {
    Nfc,
    Nfd,
    Nfkc,
    Nfkd,
    Lowercase,
    /// Prepend the string to non-empty text.
    Prepend(String),
    Replace(String, String),
    /// Add `prefix` unless the text already starts with it.
    PrefixUnlessPresent(String, PrependScheme),
}

#[derive(Clone, Debug, Default)]
pub(crate) struct Normalizer {
    pub ops: Vec<NormOp>,
}

impl Normalizer {
    /// `first`: this span starts the input (for prefixes added only at the start).
    pub(crate) fn apply<'a>(&self, text: &'a str, first: bool) -> Cow<'a, str> {
        let mut cur: Cow<'a, str> = Cow::Borrowed(text);
        for op in &self.ops {
            cur = match op {
                NormOp::Nfc => Cow::Owned(cur.nfc().collect()),
                NormOp::Nfd => Cow::Owned(cur.nfd().collect()),
                NormOp::Nfkc => Cow::Owned(cur.nfkc().collect()),
                NormOp::Nfkd => Cow::Owned(cur.nfkd().collect()),
                NormOp::Lowercase => Cow::Owned(cur.to_lowercase()),
                NormOp::Prepend(p) => {
                    if cur.is_empty() {
                        cur
                    } else {
                        Cow::Owned(format!("{p}{cur}"))
                    }
                }
                NormOp::Replace(from, to) => {
                    if !from.is_empty() && cur.contains(from.as_str()) {
                        Cow::Owned(cur.replace(from.as_str(), to))
                    } else {
                        cur
                    }
                }
                NormOp::PrefixUnlessPresent(p, scheme) => {
                    if cur.is_empty()
                        || cur.starts_with(p.as_str())
                        || (*scheme == PrependScheme::First && !first)
                    {
                        cur
                    } else {
                        Cow::Owned(format!("{p}{cur}"))
                    }
                }
            };
        }
        cur
    }
}

const WS_TAIL: &str = r"\s+(?!\S)|\s+";

/// Compiles a split regex.
///
/// `\s+(?!\S)|\s+` at the end of a pattern means: a whitespace run, less its last character
/// when a non-space follows and the run has at least two characters (the last one then
/// starts the next piece). Run as `\s+`, a match that is all whitespace came from that tail
/// unless the pattern has a `\s*[\r\n]+` alternative and the match holds a newline (that
/// alternative wins whenever the run has one), so the shortening is applied exactly there.
pub(crate) fn compile(pattern: &str) -> Result<Pattern, TokenizerError> {
    if let Some(prefix) = pattern.strip_suffix(WS_TAIL) {
        if let Ok(re) = meta::Regex::new(&format!(r"{prefix}\s+")) {
            return Ok(Pattern::Fast {
                re: Box::new(re),
                ws_lookahead: true,
                newline_alt: prefix.contains(r"\s*[\r\n]+"),
            });
        }
    }
    if let Ok(re) = meta::Regex::new(pattern) {
        return Ok(Pattern::Fast {
            re: Box::new(re),
            ws_lookahead: false,
            newline_alt: false,
        });
    }
    fancy_regex::RegexBuilder::new(pattern)
        .backtrack_limit(1_000_000)
        .build()
        .map(Pattern::Fancy)
        .map_err(|e| TokenizerError::Regex(format!("{pattern:?}: {e}")))
}

fn isolated(pattern: &str) -> Result<PreStep, TokenizerError> {
    Ok(PreStep::Split {
        pattern: compile(pattern)?,
        behavior: Behavior::Isolated,
    })
}

/// `tokenizer.ggml.pre` names whose Hugging Face tokenizers set `ignore_merges`.
pub(crate) fn gguf_pre_ignores_merges(pre: &str) -> bool {
    matches!(
        pre,
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral"
    )
}

impl PreTokenizer {
    /// The split used by llama.cpp for each `tokenizer.ggml.pre` value (a sequence of
    /// patterns, each refining the pieces of the previous one; text between matches is kept).
    pub(crate) fn for_gguf_pre(pre: &str) -> Result<PreTokenizer, TokenizerError> {
        let patterns: &[&str] = match pre {
            "default" | "" => &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
            "gpt2" | "gpt-2" | "mpt" | "olmo" | "jais" | "trillion" | "granite-docling" => &[GPT2],
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" | "dbrx" | "smaug-bpe"
            | "chatglm-bpe" => &[LLAMA3],
            "qwen2" | "stablelm2" | "hunyuan" | "deepseek-r1-qwen" | "grok-2" | "megrez" => {
                &[QWEN2]
            }
            "qwen35" => &[QWEN35],
            "gpt-4o" | "minimax-m2" => &[GPT4O],
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
            | "minerva-7b" => &[r"\p{N}", GPT2],
            other => {
                return Err(TokenizerError::Unsupported(format!(
                    "pre-tokenizer `{other}` (tokenizer.ggml.pre) is not known to caldera"
                )))
            }
        };
        let steps = patterns
            .iter()
            .map(|p| isolated(p))
            .collect::<Result<_, _>>()?;
        Ok(PreTokenizer { steps })
    }

    /// Word ranges of `text`, in order, covering it except for removed matches.
    pub(crate) fn split(&self, text: &str) -> Result<Vec<Range<usize>>, TokenizerError> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let mut pieces: Vec<Range<usize>> = std::iter::once(0..text.len()).collect();
        for step in &self.steps {
            let PreStep::Split { pattern, behavior } = step;
            let mut next = Vec::with_capacity(pieces.len() * 2);
            for r in pieces {
                split_one(&text[r.clone()], r.start, pattern, *behavior, &mut next)?;
            }
            pieces = next;
        }
        Ok(pieces)
    }
}

fn split_one(
    s: &str,
    base: usize,
    pattern: &Pattern,
    behavior: Behavior,
    out: &mut Vec<Range<usize>>,
) -> Result<(), TokenizerError> {
    // (range, is_match) covering s.
    let mut parts: Vec<(Range<usize>, bool)> = Vec::new();
    let mut last = 0;
    let mut push_match = |m: Range<usize>, parts: &mut Vec<(Range<usize>, bool)>| {
        if m.start > last {
            parts.push((last..m.start, false));
        }
        if m.end > m.start {
            parts.push((m.clone(), true));
        }
        last = m.end;
    };
    match pattern {
        Pattern::Fast {
            re,
            ws_lookahead,
            newline_alt,
        } => {
            let mut pos = 0;
            while pos < s.len() {
                let Some(m) = re.search(&Input::new(s).span(pos..s.len())) else {
                    break;
                };
                let (start, mut end) = (m.start(), m.end());
                if end == start {
                    // An empty match: step over one character.
                    pos = start + s[start..].chars().next().map_or(1, char::len_utf8);
                    continue;
                }
                if *ws_lookahead && end < s.len() {
                    let mt = &s[start..end];
                    if mt.chars().all(char::is_whitespace)
                        && !(*newline_alt && mt.contains(['\r', '\n']))
                    {
                        if let Some((last, _)) = mt.char_indices().last() {
                            if last > 0 {
                                end = start + last;
                            }
                        }
                    }
                }
                push_match(start..end, &mut parts);
                pos = end;
            }
        }
        Pattern::Fancy(re) => {
            for m in re.find_iter(s) {
                let m = m.map_err(|e| TokenizerError::Encode(format!("pre-tokenizer: {e}")))?;
                push_match(m.range(), &mut parts);
            }
        }
        Pattern::Literal(lit) => {
            if !lit.is_empty() {
                for (i, _) in s.match_indices(lit.as_str()) {
                    push_match(i..i + lit.len(), &mut parts);
                }
            }
        }
    }
    if last < s.len() {
        parts.push((last..s.len(), false));
    }
    let shift = |r: &Range<usize>| base + r.start..base + r.end;
    match behavior {
        Behavior::Isolated => out.extend(parts.iter().map(|(r, _)| shift(r))),
        Behavior::Removed => out.extend(parts.iter().filter(|p| !p.1).map(|(r, _)| shift(r))),
        Behavior::MergedWithPrevious => {
            let mut cur: Option<Range<usize>> = None;
            for (r, is_match) in &parts {
                match (&mut cur, is_match) {
                    (Some(c), true) => c.end = r.end,
                    _ => {
                        if let Some(c) = cur.take() {
                            out.push(shift(&c));
                        }
                        cur = Some(r.clone());
                    }
                }
            }
            out.extend(cur.as_ref().map(shift));
        }
        Behavior::MergedWithNext => {
            let mut cur: Option<Range<usize>> = None;
            for (r, is_match) in &parts {
                match &mut cur {
                    Some(c) => {
                        c.end = r.end;
                        if !is_match {
                            out.push(shift(c));
                            cur = None;
                        }
                    }
                    None => {
                        if *is_match {
                            cur = Some(r.clone());
                        } else {
                            out.push(shift(r));
                        }
                    }
                }
            }
            out.extend(cur.as_ref().map(shift));
        }
        Behavior::Contiguous => {
            let mut cur: Option<(Range<usize>, bool)> = None;
            for (r, is_match) in &parts {
                match &mut cur {
                    Some((c, m)) if *m == *is_match && *is_match => c.end = r.end,
                    _ => {
                        if let Some((c, _)) = cur.take() {
                            out.push(shift(&c));
                        }
                        cur = Some((r.clone(), *is_match));
                    }
                }
            }
            out.extend(cur.as_ref().map(|(c, _)| shift(c)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn pieces(p: &Pattern, s: &str) -> Vec<String> {
        let mut out = Vec::new();
        split_one(s, 0, p, Behavior::Isolated, &mut out).expect("split");
        out.into_iter().map(|r| s[r].to_owned()).collect()
    }

    /// The linear-time emulation of `\s+(?!\S)|\s+` splits exactly like the backtracking
    /// original, on random mixes of whitespace, letters, digits, marks and punctuation.
    #[test]
    fn whitespace_lookahead_emulation_matches_backtracking() {
        let alphabet = [
            " ", " ", "  ", "\t", "\n", "\r\n", "\u{3000}", "\u{a0}", "a", "Bc", "é", "e\u{301}",
            "7", "42", "'s", "'LL", "!", "?!", ".\n", "{", "日本", "😀", "_", "-", "\u{200b}",
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for pat in [GPT2, LLAMA3, QWEN2, QWEN35, GPT4O] {
            let fast = compile(pat).expect("compile");
            assert!(
                matches!(
                    fast,
                    Pattern::Fast {
                        ws_lookahead: true,
                        ..
                    }
                ),
                "{pat}"
            );
            let slow = Pattern::Fancy(fancy_regex::Regex::new(pat).expect("fancy"));
            for _ in 0..3000 {
                let n = rng.gen_range(0..14);
                let s: String = (0..n)
                    .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
                    .collect();
                assert_eq!(
                    pieces(&fast, &s),
                    pieces(&slow, &s),
                    "pattern {pat} on {s:?}"
                );
            }
        }
    }

    #[test]
    fn long_whitespace_runs_are_fine() {
        let p = compile(GPT2).expect("compile");
        let s = format!("{}x{}", " ".repeat(200_000), "\n".repeat(100_000));
        assert_eq!(pieces(&p, &s).len(), 3);
    }
}
