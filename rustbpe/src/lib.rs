//! rustbpe: train a GPT-4 style byte-level BPE tokenizer, export it to tiktoken.
//!
//! Python API (a drop-in for upstream nanochat's rustbpe):
//!     tok = rustbpe.Tokenizer()
//!     tok.train_from_iterator(iterator, vocab_size, buffer_size=8192, pattern=None)
//!     tok.get_pattern(); tok.get_mergeable_ranks()  # [(bytes, rank)] in rank order
//!     tok.encode(text); tok.batch_encode(texts); tok.decode(ids); tok.batch_decode(batch); tok.vocab_size
//!
//! `vocab_size` counts the 256 byte tokens plus the merges. Training on an empty iterator (or on text with
//! no adjacent pairs) is not an error: it gives a valid byte-level tokenizer with fewer (or no) merges.
//! Every failure is a Python exception (ValueError for bad arguments, the iterator's own exception if it
//! raises, TypeError for non-str items); nothing panics.

mod bpe;

use ahash::AHashMap;
use fancy_regex::Regex;
use pyo3::exceptions::{PyTypeError, PyUnicodeDecodeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

/// nanochat's split pattern: GPT-4's, with `\p{N}{1,2}` instead of `\p{N}{1,3}`.
const SPLIT_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

fn compile(pattern: &str) -> PyResult<Regex> {
    Regex::new(pattern)
        .map_err(|e| PyValueError::new_err(format!("invalid regex pattern {pattern:?}: {e}")))
}

/// A trained byte-level BPE tokenizer. A fresh one has no merges (every byte is its own token) and
/// nanochat's split pattern.
#[pyclass(module = "rustbpe")]
pub struct Tokenizer {
    /// Merged pairs in training order: merges[i] created token 256 + i.
    merges: Vec<bpe::Pair>,
    pattern: String,
    compiled: Regex,
    /// Token id -> bytes.
    vocab: Vec<Vec<u8>>,
    /// Token bytes -> id (= rank), for tiktoken-identical encoding.
    ranks: AHashMap<Vec<u8>, u32>,
}

impl Tokenizer {
    fn from_merges(merges: Vec<bpe::Pair>, pattern: String, compiled: Regex) -> Self {
        let vocab = bpe::build_vocab(&merges);
        let ranks = vocab
            .iter()
            .enumerate()
            .map(|(i, b)| (b.clone(), i as u32))
            .collect();
        Self {
            merges,
            pattern,
            compiled,
            vocab,
            ranks,
        }
    }

    fn encode_str(&self, text: &str) -> PyResult<Vec<u32>> {
        bpe::encode(text, &self.compiled, &self.ranks).map_err(PyValueError::new_err)
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

/// Pull up to `n` strings from a Python iterator (GIL held). Returns true once the iterator is exhausted.
fn refill(
    it: &mut Bound<'_, pyo3::types::PyIterator>,
    n: usize,
    buf: &mut Vec<String>,
    seen: &mut u64,
) -> PyResult<bool> {
    buf.clear();
    while buf.len() < n {
        match it.next() {
            None => return Ok(true),
            Some(item) => {
                let item = item?;
                let s: String = item.extract().map_err(|_| {
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
        Ok(Self::from_merges(
            Vec::new(),
            SPLIT_PATTERN.to_string(),
            compile(SPLIT_PATTERN)?,
        ))
    }

    /// Train on an iterator of str: strings are pulled `buffer_size` at a time under the GIL, then split
    /// and counted in parallel without it. `vocab_size` = 256 bytes + merges (fewer merges if the text runs
    /// out of pairs). `pattern=None` uses nanochat's split pattern. On error the tokenizer is unchanged.
    #[pyo3(signature = (iterator, vocab_size, buffer_size=8192, pattern=None))]
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
                "vocab_size must be at least 256 (the byte tokens), got {vocab_size}"
            )));
        }
        if buffer_size < 1 {
            return Err(PyValueError::new_err(format!(
                "buffer_size must be >= 1, got {buffer_size}"
            )));
        }
        let pattern = pattern.unwrap_or_else(|| SPLIT_PATTERN.to_string());
        let compiled = compile(&pattern)?;
        let mut it = iterator.try_iter()?;

        let mut counts: AHashMap<String, i64> = AHashMap::new();
        let mut buf: Vec<String> = Vec::with_capacity(buffer_size as usize);
        let mut seen = 0u64;
        loop {
            let exhausted = refill(&mut it, buffer_size as usize, &mut buf, &mut seen)?;
            let local = py
                .allow_threads(|| bpe::count_chunks(&buf, &compiled))
                .map_err(PyValueError::new_err)?;
            counts = bpe::merge_counts(counts, local);
            if exhausted {
                break;
            }
        }

        let num_merges = (vocab_size - 256) as u32;
        let merges = py.allow_threads(|| bpe::train(counts, num_merges));
        *self = Self::from_merges(merges, pattern, compiled);
        Ok(())
    }

    /// The regex pattern used to split text into chunks.
    fn get_pattern(&self) -> String {
        self.pattern.clone()
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
    fn encode(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        py.allow_threads(|| self.encode_str(text))
    }

    /// Encode many texts in parallel (GIL released).
    fn batch_encode(&self, py: Python<'_>, texts: Vec<String>) -> PyResult<Vec<Vec<u32>>> {
        use rayon::prelude::*;
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
            self.pattern
        )
    }
}

#[pymodule]
fn rustbpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Tokenizer>()?;
    m.add("SPLIT_PATTERN", SPLIT_PATTERN)?;
    Ok(())
}
