//! rustbpe: train a GPT-4 style byte-level BPE tokenizer, export it to tiktoken.
//!
//! Python API (a drop-in for upstream nanochat's rustbpe and the PyPI `rustbpe` wheel):
//!     tok = rustbpe.Tokenizer()
//!     tok.train_from_iterator(iterator, vocab_size, buffer_size=8192, pattern=None)
//!     tok.get_pattern(); tok.get_mergeable_ranks()  # [(bytes, rank)] in rank order
//!     tok.encode(text); tok.batch_encode(texts); tok.decode(ids); tok.batch_decode(batch); tok.vocab_size
//!     rustbpe.GPT4_PATTERN (the default, as in the wheel), rustbpe.SPLIT_PATTERN (nanochat's: pass it)
//!
//! For the same text, vocab size and pattern, the ranks equal the wheel's byte for byte (the same rule:
//! most frequent pair, ties to the smallest pair), about 5x faster: GPT-4-style patterns are split by a
//! hand-written scanner instead of fancy-regex (split.rs), and merges rewrite words in place (bpe.rs).
//!
//! `vocab_size` counts the 256 byte tokens plus the merges. Training on an empty iterator (or on text with
//! no adjacent pairs) is not an error: it gives a valid byte-level tokenizer with fewer (or no) merges.
//! Every failure is a Python exception (ValueError for bad arguments, the iterator's own exception if it
//! raises, TypeError for non-str items); nothing panics. Text with lone surrogates (not valid UTF-8) is
//! handled as tiktoken handles it: each becomes U+FFFD, in training and in encoding.

mod bpe;
mod split;

use ahash::AHashMap;
use pyo3::exceptions::{PyTypeError, PyUnicodeDecodeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};
use std::borrow::Cow;

use split::{Splitter, GPT4_PATTERN, NANOCHAT_PATTERN as SPLIT_PATTERN};

fn compile(pattern: &str) -> PyResult<Splitter> {
    Splitter::new(pattern).map_err(PyValueError::new_err)
}

/// A trained byte-level BPE tokenizer. A fresh one has no merges (every byte is its own token) and GPT-4's
/// split pattern (the wheel's fresh one has an empty pattern, which encodes every text to []; with no merges
/// any pattern gives the same byte tokens, so ours keeps the one default instead).
#[pyclass(module = "rustbpe")]
pub struct Tokenizer {
    /// Merged pairs in training order: merges[i] created token 256 + i.
    merges: Vec<bpe::Pair>,
    splitter: Splitter,
    /// Token id -> bytes.
    vocab: Vec<Vec<u8>>,
    /// Token bytes -> id (= rank), for tiktoken-identical encoding.
    ranks: AHashMap<Vec<u8>, u32>,
}

impl Tokenizer {
    fn from_merges(merges: Vec<bpe::Pair>, splitter: Splitter) -> Self {
        let vocab = bpe::build_vocab(&merges);
        let ranks = vocab
            .iter()
            .enumerate()
            .map(|(i, b)| (b.clone(), i as u32))
            .collect();
        Self {
            merges,
            splitter,
            vocab,
            ranks,
        }
    }

    fn encode_str(&self, text: &str) -> PyResult<Vec<u32>> {
        bpe::encode(text, &self.splitter, &self.ranks).map_err(PyValueError::new_err)
    }

    fn decode_bytes(&self, ids: &[u32]) -> PyResult<Vec<u8>> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let bytes = self.vocab.get(id as usize).ok_or_else(|| {
                PyValueError::new_err(format!(
                    "unknown token id {id} (vocab size {})",
                    self.vocab.len()
                ))
            })?;
            out.extend_from_slice(bytes);
        }
        Ok(out)
    }
}

/// A Python str as UTF-8. A str holding lone surrogates cannot be UTF-8: like tiktoken, round-trip it
/// through UTF-16 with surrogatepass and decode with errors="replace" (a lone surrogate becomes U+FFFD,
/// a surrogate pair written as two code points becomes the character it encodes).
fn utf8_of<'a>(s: &'a Bound<'_, PyString>) -> PyResult<Cow<'a, str>> {
    match s.to_str() {
        Ok(text) => Ok(Cow::Borrowed(text)),
        Err(_) => {
            let fixed = s
                .call_method1("encode", ("utf-16", "surrogatepass"))?
                .call_method1("decode", ("utf-16", "replace"))?;
            Ok(Cow::Owned(
                fixed.downcast_into::<PyString>()?.to_str()?.to_owned(),
            ))
        }
    }
}

/// Pull up to `n` strings from a Python iterator (GIL held). Returns true once the iterator is exhausted.
fn refill<'py>(
    it: &mut Bound<'py, pyo3::types::PyIterator>,
    n: usize,
    buf: &mut Vec<Bound<'py, PyString>>,
    seen: &mut u64,
) -> PyResult<bool> {
    buf.clear();
    while buf.len() < n {
        match it.next() {
            None => return Ok(true),
            Some(item) => {
                let item = item?;
                let s = item.downcast_into::<PyString>().map_err(|e| {
                    let item = e.into_inner();
                    let kind = item
                        .get_type()
                        .name()
                        .map(|n| n.to_string())
                        .unwrap_or_else(|_| "?".into());
                    PyTypeError::new_err(format!(
                        "train_from_iterator expects str items, item {seen} is {kind}"
                    ))
                })?;
                buf.push(s);
                *seen += 1;
            }
        }
    }
    Ok(false)
}

#[pymethods]
impl Tokenizer {
    #[new]
    fn new() -> PyResult<Self> {
        Ok(Self::from_merges(Vec::new(), compile(GPT4_PATTERN)?))
    }

    /// Train on an iterator of str: strings are pulled `buffer_size` at a time under the GIL, then split
    /// and counted in parallel without it. `vocab_size` = 256 bytes + merges (fewer merges if the text runs
    /// out of pairs). `pattern=None` uses GPT-4's split pattern, the wheel's default, so that code written
    /// for the wheel trains the same tokenizer here (nanochat passes its SPLIT_PATTERN explicitly). On error
    /// the tokenizer is unchanged.
    #[pyo3(signature = (iterator, vocab_size, buffer_size=8192, pattern=None))]
    // The wheel's text signature, so that inspect.signature shows the same (pyo3's own marks self "/").
    #[pyo3(text_signature = "(self, iterator, vocab_size, buffer_size=8192, pattern=None)")]
    fn train_from_iterator(
        &mut self,
        py: Python<'_>,
        iterator: &Bound<'_, PyAny>,
        vocab_size: i64,
        buffer_size: i64,
        pattern: Option<String>,
    ) -> PyResult<()> {
        if !(256..=u32::MAX as i64).contains(&vocab_size) {
            return Err(PyValueError::new_err(format!(
                "vocab_size must be at least 256 (the byte tokens) and below 2**32, got {vocab_size}"
            )));
        }
        if buffer_size < 1 {
            return Err(PyValueError::new_err(format!(
                "buffer_size must be >= 1, got {buffer_size}"
            )));
        }
        let splitter = compile(pattern.as_deref().unwrap_or(GPT4_PATTERN))?;
        let mut it = iterator.try_iter()?;

        let mut counts: AHashMap<String, i64> = AHashMap::new();
        let mut buf = Vec::with_capacity(buffer_size.min(1 << 20) as usize);
        let mut seen = 0u64;
        loop {
            let exhausted = refill(&mut it, buffer_size as usize, &mut buf, &mut seen)?;
            // The texts are read in place (str objects are immutable and `buf` keeps them alive).
            let texts: Vec<Cow<str>> = buf.iter().map(utf8_of).collect::<PyResult<_>>()?;
            let local = py
                .allow_threads(|| bpe::count_chunks(&texts, &splitter))
                .map_err(PyValueError::new_err)?;
            bpe::add_counts(&mut counts, local);
            if exhausted {
                break;
            }
        }

        let num_merges = (vocab_size - 256) as u32;
        let merges = py.allow_threads(|| bpe::train(counts, num_merges));
        *self = Self::from_merges(merges, splitter);
        Ok(())
    }

    /// The regex pattern used to split text into chunks.
    fn get_pattern(&self) -> String {
        self.splitter.pattern().to_string()
    }

    /// [(token_bytes, rank)] for every token in rank (= id) order, ready for tiktoken.Encoding.
    fn get_mergeable_ranks<'py>(&self, py: Python<'py>) -> Vec<(Bound<'py, PyBytes>, u32)> {
        self.vocab
            .iter()
            .enumerate()
            .map(|(i, b)| (PyBytes::new(py, b), i as u32))
            .collect()
    }

    /// 256 + number of merges.
    #[getter]
    fn vocab_size(&self) -> usize {
        256 + self.merges.len()
    }

    /// Encode text to token ids (identical to tiktoken's encode_ordinary with these ranks and pattern).
    fn encode(&self, py: Python<'_>, text: &Bound<'_, PyString>) -> PyResult<Vec<u32>> {
        let text = utf8_of(text)?;
        py.allow_threads(|| self.encode_str(&text))
    }

    /// Encode many texts in parallel (GIL released).
    fn batch_encode(
        &self,
        py: Python<'_>,
        texts: Vec<Bound<'_, PyString>>,
    ) -> PyResult<Vec<Vec<u32>>> {
        use rayon::prelude::*;
        let texts: Vec<Cow<str>> = texts.iter().map(utf8_of).collect::<PyResult<_>>()?;
        py.allow_threads(|| texts.par_iter().map(|t| self.encode_str(t)).collect())
    }

    /// Decode ids to str; ValueError for an unknown id, UnicodeDecodeError if the bytes are not UTF-8.
    fn decode(&self, py: Python<'_>, ids: Vec<u32>) -> PyResult<String> {
        let bytes = self.decode_bytes(&ids)?;
        String::from_utf8(bytes).map_err(|e| {
            let err = e.utf8_error();
            match PyUnicodeDecodeError::new_utf8(py, e.as_bytes(), err) {
                Ok(exc) => PyErr::from_value(exc.into_any()),
                Err(other) => other,
            }
        })
    }

    /// Decode many id lists.
    fn batch_decode(&self, py: Python<'_>, batch: Vec<Vec<u32>>) -> PyResult<Vec<String>> {
        batch.into_iter().map(|ids| self.decode(py, ids)).collect()
    }

    fn __repr__(&self) -> String {
        format!(
            "rustbpe.Tokenizer(vocab_size={}, pattern={:?})",
            self.vocab_size(),
            self.splitter.pattern()
        )
    }
}

/// For tests: the pieces `text` splits into with `pattern` (default GPT-4's, as in training), by the
/// splitter that training and encoding use (`reference=False`: the hand-written scanner for the GPT-4
/// patterns) or by fancy-regex (`reference=True`).
#[pyfunction]
#[pyo3(signature = (text, pattern=None, reference=false))]
fn _split(text: &str, pattern: Option<&str>, reference: bool) -> PyResult<Vec<String>> {
    let splitter = compile(pattern.unwrap_or(GPT4_PATTERN))?;
    let mut pieces = Vec::new();
    let push = |p: &str| pieces.push(p.to_string());
    let result = if reference {
        splitter.for_each_regex(text, push)
    } else {
        splitter.for_each(text, push)
    };
    result.map_err(PyValueError::new_err)?;
    Ok(pieces)
}

#[pymodule]
fn rustbpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Tokenizer>()?;
    m.add_function(wrap_pyfunction!(_split, m)?)?;
    m.add("SPLIT_PATTERN", SPLIT_PATTERN)?;
    m.add("GPT4_PATTERN", GPT4_PATTERN)?;
    Ok(())
}
