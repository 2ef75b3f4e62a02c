//! Cutting text at special tokens before the model sees it.
//!
//! Candidates are control, unknown and user-defined tokens with non-empty text. Matching
//! gives priority to longer tokens (then lower ids, then earlier positions): a token's
//! occurrence is taken unless it overlaps one already taken. This is the same result as
//! scanning the text once per token, longest token first (llama.cpp's order).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::ops::Range;

use super::{TokenEntry, TokenType};

/// A piece of the input: plain text (a byte range into it) or a special token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Fragment {
    Text(Range<usize>),
    Token(u32),
}

#[derive(Debug, Default)]
struct Node {
    /// Children sorted by byte.
    children: Vec<(u8, u32)>,
    token: Option<u32>,
}

/// A byte trie over the special tokens' texts.
#[derive(Debug)]
pub(crate) struct SpecialMatcher {
    nodes: Vec<Node>,
}

impl SpecialMatcher {
    pub(crate) fn new(tokens: &[TokenEntry]) -> SpecialMatcher {
        let mut nodes = vec![Node::default()];
        for (id, t) in tokens.iter().enumerate() {
            if t.text.is_empty()
                || !matches!(
                    t.kind,
                    TokenType::Control | TokenType::Unknown | TokenType::UserDefined
                )
            {
                continue;
            }
            let mut cur = 0usize;
            for &b in t.text.as_bytes() {
                cur = match nodes[cur].children.binary_search_by_key(&b, |c| c.0) {
                    Ok(i) => nodes[cur].children[i].1 as usize,
                    Err(i) => {
                        let next = nodes.len();
                        nodes.push(Node::default());
                        nodes[cur].children.insert(i, (b, next as u32));
                        next
                    }
                };
            }
            // Duplicate texts: the lowest id wins.
            nodes[cur].token.get_or_insert(id as u32);
        }
        SpecialMatcher { nodes }
    }

    fn child(&self, node: usize, b: u8) -> Option<usize> {
        let ch = &self.nodes[node].children;
        ch.binary_search_by_key(&b, |c| c.0)
            .ok()
            .map(|i| ch[i].1 as usize)
    }

    /// The longest allowed token starting at `p` whose length is at most `max_len`.
    fn longest_at(
        &self,
        bytes: &[u8],
        p: usize,
        max_len: usize,
        tokens: &[TokenEntry],
        parse_special: bool,
    ) -> Option<(usize, u32)> {
        let mut node = 0usize;
        let mut best = None;
        let end = bytes.len().min(p.saturating_add(max_len));
        for (i, &b) in bytes[p..end].iter().enumerate() {
            match self.child(node, b) {
                Some(n) => node = n,
                None => break,
            }
            if let Some(id) = self.nodes[node].token {
                if parse_special || tokens[id as usize].kind == TokenType::UserDefined {
                    best = Some((i + 1, id));
                }
            }
        }
        best
    }

    /// Splits `text` into plain-text ranges and special tokens. User-defined tokens always
    /// match; control and unknown tokens only with `parse_special`.
    ///
    /// Each position offers its longest match; the heap hands out the longest offer overall
    /// (then lowest id, then leftmost). An offer that would overlap a taken span is replaced
    /// by the longest match at the same position that ends before that span, so each
    /// position is walked a bounded number of times and memory stays linear.
    pub(crate) fn partition(
        &self,
        text: &str,
        tokens: &[TokenEntry],
        parse_special: bool,
    ) -> Vec<Fragment> {
        if text.is_empty() {
            return Vec::new();
        }
        if self.nodes[0].children.is_empty() {
            return vec![Fragment::Text(0..text.len())];
        }
        let bytes = text.as_bytes();
        let mut heap: BinaryHeap<(usize, Reverse<u32>, Reverse<usize>)> = BinaryHeap::new();
        for p in 0..bytes.len() {
            if let Some((len, id)) = self.longest_at(bytes, p, usize::MAX, tokens, parse_special) {
                heap.push((len, Reverse(id), Reverse(p)));
            }
        }
        if heap.is_empty() {
            return vec![Fragment::Text(0..text.len())];
        }
        let mut taken = vec![false; bytes.len()];
        let mut chosen: Vec<(usize, usize, u32)> = Vec::new();
        while let Some((len, Reverse(id), Reverse(p))) = heap.pop() {
            if taken[p] {
                continue;
            }
            match taken[p..p + len].iter().position(|&t| t) {
                None => {
                    taken[p..p + len].iter_mut().for_each(|t| *t = true);
                    chosen.push((p, len, id));
                }
                Some(q) => {
                    if let Some((l2, id2)) = self.longest_at(bytes, p, q, tokens, parse_special) {
                        heap.push((l2, Reverse(id2), Reverse(p)));
                    }
                }
            }
        }
        chosen.sort_unstable();
        let mut out = Vec::with_capacity(chosen.len() * 2 + 1);
        let mut pos = 0;
        for (start, len, id) in chosen {
            if start > pos {
                out.push(Fragment::Text(pos..start));
            }
            out.push(Fragment::Token(id));
            pos = start + len;
        }
        if pos < bytes.len() {
            out.push(Fragment::Text(pos..bytes.len()));
        }
        out
    }
}
