//! The Qwen2.5-VL tokenizer with QoQ-Med's `<|time_series_pad|>` (spec §3.3).
//!
//! A `tokenizer.json` is loaded with HF `tokenizers`; its own added-token table is replaced by the
//! Qwen2.5-VL one built here (ids 151643-151664 on the real vocabulary) plus
//! `<|time_series_pad|>` at 151665, as `tokenization_time_series_qwen2.py::_add_timeseries_token`
//! assigns it. The Qwen3 `tokenizer.json` we test with has the same ids 0-151664 but gives
//! 151665+ to other tokens, so the file's table cannot be taken as is.
//!
//! Added tokens get consecutive ids from the model vocabulary's size (the way `tokenizers`
//! deserialises them); for the real 151643-entry vocabulary that is exactly the documented table.

use crate::error::{Error, Result};
use serde_json::{Value, json};
use std::path::Path;

/// The Qwen2.5-VL added tokens in id order (151643 first) and whether each is special.
pub const QWEN25_VL_ADDED_TOKENS: [(&str, bool); 22] = [
    ("<|endoftext|>", true),
    ("<|im_start|>", true),
    ("<|im_end|>", true),
    ("<|object_ref_start|>", true),
    ("<|object_ref_end|>", true),
    ("<|box_start|>", true),
    ("<|box_end|>", true),
    ("<|quad_start|>", true),
    ("<|quad_end|>", true),
    ("<|vision_start|>", true),
    ("<|vision_end|>", true),
    ("<|vision_pad|>", true),
    ("<|image_pad|>", true),
    ("<|video_pad|>", true),
    ("<tool_call>", false),
    ("</tool_call>", false),
    ("<|fim_prefix|>", false),
    ("<|fim_middle|>", false),
    ("<|fim_suffix|>", false),
    ("<|fim_pad|>", false),
    ("<|repo_name|>", false),
    ("<|file_sep|>", false),
];

/// QoQ-Med's ECG placeholder, an additional special token after the Qwen2.5-VL table.
pub const TIME_SERIES_TOKEN: &str = "<|time_series_pad|>";
/// The image placeholder the chat template emits once per image.
pub const IMAGE_PAD: &str = "<|image_pad|>";
/// The video placeholder.
pub const VIDEO_PAD: &str = "<|video_pad|>";

/// Ids of the tokens the processor uses, as this tokenizer assigns them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialIds {
    /// `<|endoftext|>`: pad and bos (151643).
    pub endoftext: u32,
    /// `<|im_start|>` (151644).
    pub im_start: u32,
    /// `<|im_end|>`: eos (151645).
    pub im_end: u32,
    /// `<|vision_start|>` (151652).
    pub vision_start: u32,
    /// `<|vision_end|>` (151653).
    pub vision_end: u32,
    /// `<|image_pad|>` (151655).
    pub image_pad: u32,
    /// `<|video_pad|>` (151656).
    pub video_pad: u32,
    /// `<|time_series_pad|>` (151665).
    pub time_series_pad: u32,
}

/// The tokenizer: HF `tokenizers` plus the Qwen2.5-VL / QoQ added-token table.
#[derive(Clone)]
pub struct QoqTokenizer {
    inner: tokenizers::Tokenizer,
    /// Ids of the special tokens.
    pub ids: SpecialIds,
}

impl std::fmt::Debug for QoqTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QoqTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("ids", &self.ids)
            .finish()
    }
}

impl QoqTokenizer {
    /// Load a `tokenizer.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::File {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::from_json_bytes(&bytes).map_err(|e| match e {
            Error::Tokenizer(m) => Error::File {
                path: path.to_path_buf(),
                message: m,
            },
            other => other,
        })
    }

    /// Load from the bytes of a `tokenizer.json`.
    pub fn from_json_bytes(bytes: &[u8]) -> Result<Self> {
        let mut v: Value = serde_json::from_slice(bytes)
            .map_err(|e| Error::Tokenizer(format!("not a tokenizer.json: {e}")))?;
        let vocab_len = v
            .pointer("/model/vocab")
            .and_then(|voc| match voc {
                Value::Object(m) => Some(m.len()),
                Value::Array(a) => Some(a.len()),
                _ => None,
            })
            .ok_or_else(|| Error::Tokenizer("tokenizer.json has no model.vocab".into()))?;
        let table: Vec<(&str, bool)> = QWEN25_VL_ADDED_TOKENS
            .iter()
            .copied()
            .chain(std::iter::once((TIME_SERIES_TOKEN, true)))
            .collect();
        let added: Vec<Value> = table
            .iter()
            .enumerate()
            .map(|(i, (content, special))| {
                json!({
                    "id": vocab_len + i,
                    "content": content,
                    "single_word": false,
                    "lstrip": false,
                    "rstrip": false,
                    "normalized": false,
                    "special": special,
                })
            })
            .collect();
        v["added_tokens"] = Value::Array(added);
        let text = serde_json::to_vec(&v).map_err(|e| Error::Tokenizer(e.to_string()))?;
        let inner = tokenizers::Tokenizer::from_bytes(&text)
            .map_err(|e| Error::Tokenizer(format!("cannot build the tokenizer: {e}")))?;
        for (i, (content, _)) in table.iter().enumerate() {
            let want = (vocab_len + i) as u32;
            let got = inner.token_to_id(content);
            if got != Some(want) {
                return Err(Error::Tokenizer(format!(
                    "added token {content} got id {got:?}, expected {want} (does the vocabulary \
                     already contain it?)"
                )));
            }
        }
        let id = |t: &str| inner.token_to_id(t).expect("checked above");
        let ids = SpecialIds {
            endoftext: id("<|endoftext|>"),
            im_start: id("<|im_start|>"),
            im_end: id("<|im_end|>"),
            vision_start: id("<|vision_start|>"),
            vision_end: id("<|vision_end|>"),
            image_pad: id(IMAGE_PAD),
            video_pad: id(VIDEO_PAD),
            time_series_pad: id(TIME_SERIES_TOKEN),
        };
        Ok(Self { inner, ids })
    }

    /// Token ids of `text` without added bos/eos (`tokenizer.encode(text,
    /// add_special_tokens=False)`; Qwen's post-processor adds none either way).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.inner
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Tokenizer(format!("encode: {e}")))
    }

    /// Text of `ids`; special tokens are dropped when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer(format!("decode: {e}")))
    }

    /// Id of a token string, if known.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including the added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A tiny byte-level BPE with the Qwen2 pre-tokenizer: 256 byte symbols, a few merges.
    pub(crate) fn tiny_tokenizer_json() -> String {
        // The GPT-2 byte-to-unicode table: printable bytes map to themselves, the rest to 256+.
        let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
            .chain(0xA1..=0xAC)
            .chain(0xAE..=0xFF)
            .collect();
        let mut cs = bs.clone();
        let mut n = 0;
        for b in 0..256u32 {
            if !bs.contains(&b) {
                bs.push(b);
                cs.push(256 + n);
                n += 1;
            }
        }
        let mut vocab = serde_json::Map::new();
        for (i, c) in cs.iter().enumerate() {
            vocab.insert(char::from_u32(*c).unwrap().to_string(), json!(i));
        }
        let merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "s")];
        for (a, b) in merges {
            let id = vocab.len();
            vocab.insert(format!("{a}{b}"), json!(id));
        }
        json!({
            "version": "1.0",
            "added_tokens": [],
            "normalizer": {"type": "NFC"},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
                 "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}
            ]},
            "post_processor": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab,
                      "merges": merges.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>()}
        })
        .to_string()
    }

    #[test]
    fn added_tokens_follow_the_vocabulary_in_table_order() {
        let t = QoqTokenizer::from_json_bytes(tiny_tokenizer_json().as_bytes()).unwrap();
        // 256 bytes + 4 merges = 260 model tokens.
        assert_eq!(t.ids.endoftext, 260);
        assert_eq!(t.ids.im_start, 261);
        assert_eq!(t.ids.vision_start, 260 + 9);
        assert_eq!(t.ids.image_pad, 260 + 12);
        assert_eq!(t.ids.time_series_pad, 260 + 22);
        assert_eq!(t.vocab_size(), 283);
        // Special tokens in text are matched whole, the rest goes through BPE.
        let ids = t.encode("<|im_start|>the<|image_pad|> is").unwrap();
        assert_eq!(ids[0], t.ids.im_start);
        // "the" -> "t" + "he" (no leading space), then the pad, then "Ġ" + "is".
        assert_eq!(ids.len(), 6);
        assert_eq!(ids[3], t.ids.image_pad);
        assert_eq!(ids[5], 259);
        assert_eq!(
            t.decode(&ids, false).unwrap(),
            "<|im_start|>the<|image_pad|> is"
        );
        assert_eq!(t.decode(&ids, true).unwrap(), "the is");
    }

    #[test]
    fn file_added_tokens_are_replaced() {
        let mut v: Value = serde_json::from_str(&tiny_tokenizer_json()).unwrap();
        v["added_tokens"] = json!([{"id": 260, "content": "<think>", "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": false}]);
        let t = QoqTokenizer::from_json_bytes(v.to_string().as_bytes()).unwrap();
        assert_eq!(t.token_to_id("<think>"), None);
        assert_eq!(t.ids.endoftext, 260);
    }

    #[test]
    fn garbage_is_an_error() {
        let err = QoqTokenizer::from_json_bytes(b"{\"model\": {}}").unwrap_err();
        assert!(err.to_string().contains("model.vocab"), "{err}");
    }
}
