//! BPE by merge rank.
//!
//! A word starts as one symbol per byte (byte-level) or per character; the adjacent pair with
//! the lowest merge rank is merged (leftmost first on ties) until no pair has a rank. Merges
//! are kept as `(left id, right id) -> (rank, merged id)`; a merge whose parts or result are
//! not in the vocabulary is dropped at load.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::OnceLock;

use super::pretok::{Normalizer, PreTokenizer};
use super::{TokenEntry, Tokenizer, TokenizerError};

/// A multiplicative hasher for the `(u32, u32)` merge keys (SipHash is several times slower
/// here and the keys are not attacker-chosen at lookup time in a way that matters: the
/// table is fixed at load).
#[derive(Default)]
pub(crate) struct PairHasher(u64);

impl Hasher for PairHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u32(&mut self, v: u32) {
        self.0 = (self.0.rotate_left(32) ^ u64::from(v)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type PairMap = HashMap<(u32, u32), (u32, u32), BuildHasherDefault<PairHasher>>;

/// The GPT-2 byte-to-character table: printable Latin-1 bytes map to themselves, the other
/// 68 bytes to U+0100.. in byte order.
pub(crate) fn byte_to_char() -> &'static [char; 256] {
    static T: OnceLock<[char; 256]> = OnceLock::new();
    T.get_or_init(|| {
        let mut t = ['\0'; 256];
        let mut extra = 0u32;
        for b in 0..256u32 {
            let printable = (0x21..=0x7E).contains(&b)
                || (0xA1..=0xAC).contains(&b)
                || (0xAE..=0xFF).contains(&b);
            let c = if printable {
                b
            } else {
                extra += 1;
                255 + extra
            };
            t[b as usize] = char::from_u32(c).unwrap_or('\0');
        }
        t
    })
}

fn char_to_byte(c: char) -> Option<u8> {
    let v = c as u32;
    let printable =
        (0x21..=0x7E).contains(&v) || (0xA1..=0xAC).contains(&v) || (0xAE..=0xFF).contains(&v);
    if printable {
        return Some(v as u8);
    }
    if (0x100..0x100 + 68).contains(&v) {
        // Inverse of the table above: the n-th non-printable byte.
        let n = v - 0x100;
        let mut seen = 0;
        for b in 0..256u32 {
            let p = (0x21..=0x7E).contains(&b)
                || (0xA1..=0xAC).contains(&b)
                || (0xAE..=0xFF).contains(&b);
            if !p {
                if seen == n {
                    return Some(b as u8);
                }
                seen += 1;
            }
        }
    }
    None
}

/// A byte-level token string to its bytes; characters outside the alphabet are kept as
/// their UTF-8 bytes.
pub(crate) fn byte_level_decode(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match char_to_byte(c) {
            Some(b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out
}

pub(crate) struct BpeOptions {
    pub byte_level: bool,
    pub byte_fallback: bool,
    pub ignore_merges: bool,
    pub normalizer: Normalizer,
    pub pretok: PreTokenizer,
}

/// Symbol id for a character not in the vocabulary; never merges.
const NO_TOKEN: u32 = u32::MAX;

#[derive(Debug)]
pub(crate) struct Bpe {
    merges: PairMap,
    byte_level: bool,
    byte_fallback: bool,
    ignore_merges: bool,
    /// Byte-level: the token of each byte's alphabet character.
    byte_char_token: [u32; 256],
    normalizer: Normalizer,
    pretok: PreTokenizer,
}

impl Bpe {
    /// `merges` as `"left right"` strings (split at the first space after the first
    /// character); rank = index.
    pub(crate) fn from_merge_strings(
        tokens: &[TokenEntry],
        merges: &[String],
        opts: BpeOptions,
    ) -> Result<Bpe, TokenizerError> {
        let pairs = merges.iter().map(|m| {
            let first = m.chars().next().map_or(0, char::len_utf8);
            match m[first..].find(' ') {
                Some(i) => (&m[..first + i], Some(&m[first + i + 1..])),
                None => (m.as_str(), None),
            }
        });
        Bpe::from_pairs(tokens, pairs, merges.len(), opts)
    }

    /// `pairs` in rank order; a `None` right side is a malformed merge (skipped).
    pub(crate) fn from_pairs<'a>(
        tokens: &[TokenEntry],
        pairs: impl Iterator<Item = (&'a str, Option<&'a str>)>,
        count: usize,
        opts: BpeOptions,
    ) -> Result<Bpe, TokenizerError> {
        let lookup: HashMap<&str, u32> = tokens
            .iter()
            .enumerate()
            .rev()
            .map(|(i, t)| (t.text.as_str(), i as u32))
            .collect();
        let mut map = PairMap::with_capacity_and_hasher(count, Default::default());
        let mut joined = String::new();
        for (rank, (a, b)) in pairs.enumerate() {
            let Some(b) = b else { continue };
            joined.clear();
            joined.push_str(a);
            joined.push_str(b);
            if let (Some(&l), Some(&r), Some(&m)) =
                (lookup.get(a), lookup.get(b), lookup.get(joined.as_str()))
            {
                map.entry((l, r)).or_insert((rank as u32, m));
            }
        }
        let mut byte_char_token = [NO_TOKEN; 256];
        if opts.byte_level {
            let table = byte_to_char();
            let mut buf = [0u8; 4];
            for b in 0..256 {
                if let Some(&id) = lookup.get(&*table[b].encode_utf8(&mut buf)) {
                    byte_char_token[b] = id;
                }
            }
        }
        Ok(Bpe {
            merges: map,
            byte_level: opts.byte_level,
            byte_fallback: opts.byte_fallback,
            ignore_merges: opts.ignore_merges,
            byte_char_token,
            normalizer: opts.normalizer,
            pretok: opts.pretok,
        })
    }

    /// Encodes one span of plain text (no special tokens inside).
    pub(crate) fn encode(
        &self,
        tk: &Tokenizer,
        text: &str,
        first: bool,
        out: &mut Vec<u32>,
    ) -> Result<(), TokenizerError> {
        let norm = self.normalizer.apply(text, first);
        let words = self.pretok.split(&norm)?;
        let mut syms: Vec<u32> = Vec::new();
        let mut lens: Vec<u32> = Vec::new();
        let mut scratch = Scratch::default();
        for w in words {
            let word = &norm[w];
            if word.is_empty() {
                continue;
            }
            if self.ignore_merges {
                let key: std::borrow::Cow<str> = if self.byte_level {
                    let table = byte_to_char();
                    word.bytes()
                        .map(|b| table[b as usize])
                        .collect::<String>()
                        .into()
                } else {
                    word.into()
                };
                if let Some(&id) = tk.token_to_id.get(key.as_ref()) {
                    out.push(id);
                    continue;
                }
            }
            syms.clear();
            lens.clear();
            if self.byte_level {
                for b in word.bytes() {
                    syms.push(self.byte_char_token[b as usize]);
                    lens.push(1);
                }
            } else {
                let mut buf = [0u8; 4];
                for c in word.chars() {
                    let id = tk.token_to_id.get(&*c.encode_utf8(&mut buf)).copied();
                    syms.push(id.unwrap_or(NO_TOKEN));
                    lens.push(c.len_utf8() as u32);
                }
            }
            self.merge(&mut syms, &mut lens, &mut scratch);
            let mut pos = 0usize;
            for (&id, &len) in syms.iter().zip(&lens) {
                let end = pos + len as usize;
                if id != NO_TOKEN {
                    out.push(id);
                } else {
                    self.fallback(tk, &word.as_bytes()[pos..end], out);
                }
                pos = end;
            }
        }
        Ok(())
    }

    /// Bytes with no token: `<0xNN>` tokens when the vocabulary has them, else the unknown
    /// token once, else nothing.
    fn fallback(&self, tk: &Tokenizer, bytes: &[u8], out: &mut Vec<u32>) {
        if self.byte_fallback {
            let ids: Option<Vec<u32>> = bytes.iter().map(|&b| tk.byte_tokens[b as usize]).collect();
            if let Some(ids) = ids {
                out.extend(ids);
                return;
            }
        }
        if let Some(u) = tk.unk {
            out.push(u);
        }
    }

    /// Merges `syms` (token ids; `lens` their byte lengths) in place.
    fn merge(&self, syms: &mut Vec<u32>, lens: &mut Vec<u32>, s: &mut Scratch) {
        let n = syms.len();
        if n < 2 {
            return;
        }
        s.prev.clear();
        s.next.clear();
        s.heap.clear();
        s.prev.extend((0..n).map(|i| i as i64 - 1));
        s.next.extend((0..n).map(|i| i + 1));
        for i in 0..n - 1 {
            if let Some(&(rank, _)) = self.merges.get(&(syms[i], syms[i + 1])) {
                s.heap.push(Reverse((rank, i, syms[i], syms[i + 1])));
            }
        }
        while let Some(Reverse((rank, left, lid, rid))) = s.heap.pop() {
            let right = s.next[left];
            // Stale entries: the left symbol changed, was absorbed, or its neighbour changed.
            if lens[left] == 0 || right >= n || syms[left] != lid || syms[right] != rid {
                continue;
            }
            let Some(&(r2, merged)) = self.merges.get(&(lid, rid)) else {
                continue;
            };
            if r2 != rank {
                continue;
            }
            syms[left] = merged;
            lens[left] += lens[right];
            lens[right] = 0;
            let after = s.next[right];
            s.next[left] = after;
            if after < n {
                s.prev[after] = left as i64;
            }
            if s.prev[left] >= 0 {
                let p = s.prev[left] as usize;
                if let Some(&(rk, _)) = self.merges.get(&(syms[p], merged)) {
                    s.heap.push(Reverse((rk, p, syms[p], merged)));
                }
            }
            if after < n {
                if let Some(&(rk, _)) = self.merges.get(&(merged, syms[after])) {
                    s.heap.push(Reverse((rk, left, merged, syms[after])));
                }
            }
        }
        let mut w = 0;
        for r in 0..n {
            if lens[r] != 0 {
                syms[w] = syms[r];
                lens[w] = lens[r];
                w += 1;
            }
        }
        syms.truncate(w);
        lens.truncate(w);
    }
}

#[derive(Default)]
struct Scratch {
    prev: Vec<i64>,
    next: Vec<usize>,
    heap: BinaryHeap<Reverse<(u32, usize, u32, u32)>>,
}
