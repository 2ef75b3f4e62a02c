//! SentencePiece-style encoding by score.
//!
//! Spaces become `▁` (U+2581), optionally with one `▁` in front. The text starts as one
//! symbol per character; of all adjacent pairs whose concatenation is a vocabulary entry,
//! the one with the highest score is merged (leftmost on ties), until no pair is left.
//! A final symbol that is not a token (a character outside the vocabulary) becomes byte
//! tokens `<0xNN>`, or the unknown token where a byte token is missing.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::Tokenizer;

struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    /// Byte length of the merged text when the bigram was made (stale if it changed).
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    /// Max-heap order: higher score first, then lower left index.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}

struct Sym {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// Encodes one span of plain text.
pub(crate) fn encode(tk: &Tokenizer, text: &str, space_prefix: bool, out: &mut Vec<u32>) {
    let mut s = String::with_capacity(text.len() + 8);
    if space_prefix {
        s.push('\u{2581}');
    }
    for c in text.chars() {
        if c == ' ' {
            s.push('\u{2581}');
        } else {
            s.push(c);
        }
    }
    if s.is_empty() {
        return;
    }
    let mut syms: Vec<Sym> = Vec::with_capacity(s.len());
    for (i, (start, c)) in s.char_indices().enumerate() {
        syms.push(Sym {
            start,
            len: c.len_utf8(),
            prev: i.checked_sub(1),
            next: Some(i + 1),
        });
    }
    if let Some(last) = syms.last_mut() {
        last.next = None;
    }
    let mut heap = BinaryHeap::new();
    let try_add = |syms: &[Sym], heap: &mut BinaryHeap<Bigram>, l: usize, r: usize| {
        let start = syms[l].start;
        let end = syms[r].start + syms[r].len;
        if let Some(&id) = tk.token_to_id.get(&s[start..end]) {
            heap.push(Bigram {
                score: tk.tokens[id as usize].score,
                left: l,
                right: r,
                size: end - start,
            });
        }
    };
    for i in 1..syms.len() {
        try_add(&syms, &mut heap, i - 1, i);
    }
    while let Some(bg) = heap.pop() {
        let (l, r) = (bg.left, bg.right);
        if syms[l].len == 0 || syms[r].len == 0 || syms[l].len + syms[r].len != bg.size {
            continue;
        }
        if syms[l].next != Some(r) {
            continue;
        }
        syms[l].len += syms[r].len;
        syms[r].len = 0;
        let after = syms[r].next;
        syms[l].next = after;
        if let Some(a) = after {
            syms[a].prev = Some(l);
        }
        if let Some(p) = syms[l].prev {
            try_add(&syms, &mut heap, p, l);
        }
        if let Some(a) = after {
            try_add(&syms, &mut heap, l, a);
        }
    }
    for sym in syms.iter().filter(|x| x.len > 0) {
        let piece = &s[sym.start..sym.start + sym.len];
        if let Some(&id) = tk.token_to_id.get(piece) {
            out.push(id);
            continue;
        }
        for &b in piece.as_bytes() {
            if let Some(id) = tk.byte_tokens[b as usize].or(tk.unk) {
                out.push(id);
            }
        }
    }
}
