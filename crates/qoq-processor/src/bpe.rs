//! Byte-level BPE training for small Qwen2-style tokenizers (the demo's, and any model a user
//! builds from scratch): `tokenizers`' BPE trainer with Qwen2's normaliser, pre-tokeniser and
//! decoder, so that [`QoqTokenizer`] appends the Qwen2.5-VL added tokens and
//! `<|time_series_pad|>` right after its vocabulary (ids `V .. V + ADDED`).
//!
//! Deterministic: with the full byte alphabet as the initial alphabet every symbol id is fixed
//! before the merges, and the trainer breaks count ties by pair ids.

use crate::error::{Error, Result};
use crate::tokenizer::{QWEN25_VL_ADDED_TOKENS, QoqTokenizer};
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::normalizers::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    SplitDelimiterBehavior, TokenizerBuilder, TokenizerImpl,
};

/// Qwen2's pre-tokenisation pattern (the `Split` of its `tokenizer.json`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Number of tokens [`QoqTokenizer`] appends after the BPE vocabulary.
pub const ADDED: usize = QWEN25_VL_ADDED_TOKENS.len() + 1;

/// Trains the BPE on `corpus` (`vocab` entries at most, byte alphabet included) and returns the
/// `tokenizer.json` text, checked to load as a [`QoqTokenizer`].
pub fn train_bpe(corpus: &[String], vocab: usize) -> Result<(String, QoqTokenizer)> {
    if vocab < 300 {
        return Err(Error::Tokenizer(format!(
            "BPE vocabulary {vocab} is below the 256 bytes plus a few merges"
        )));
    }
    let split = Split::new(
        SplitPattern::Regex(QWEN2_SPLIT.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| Error::Tokenizer(format!("the Qwen2 split pattern: {e}")))?;
    let pre = Sequence::new(vec![
        PreTokenizerWrapper::from(split),
        PreTokenizerWrapper::from(ByteLevel::new(false, false, false)),
    ]);
    let mut tok: TokenizerImpl<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    > = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(Some(NormalizerWrapper::from(NFC)))
        .with_pre_tokenizer(Some(PreTokenizerWrapper::from(pre)))
        .with_post_processor(Some(PostProcessorWrapper::from(ByteLevel::new(
            false, false, false,
        ))))
        .with_decoder(Some(DecoderWrapper::from(ByteLevel::new(
            false, false, false,
        ))))
        .build()
        .map_err(|e| Error::Tokenizer(format!("building the tokenizer: {e}")))?;
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    tok.train(&mut trainer, corpus.iter())
        .map_err(|e| Error::Tokenizer(format!("training the BPE: {e}")))?;
    let text = tok
        .to_string(false)
        .map_err(|e| Error::Tokenizer(format!("serialising the tokenizer: {e}")))?;
    let qoq = QoqTokenizer::from_json_bytes(text.as_bytes()).map_err(|e| {
        Error::Tokenizer(format!(
            "the trained tokenizer does not load as a Qwen2.5-VL tokenizer: {e}"
        ))
    })?;
    Ok((text, qoq))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines() -> Vec<String> {
        (0..50)
            .map(|i| {
                format!(
                    "Above is a chest X-ray image of a patient. What is the diagnosis? Answer \
                     with one of the following:\nNodule\nNo Finding {i} <think>\n</think>\n\\boxed{{Nodule}}"
                )
            })
            .collect()
    }

    #[test]
    fn training_is_deterministic_and_round_trips() {
        let (a, tok) = train_bpe(&lines(), 320).unwrap();
        let (b, _) = train_bpe(&lines(), 320).unwrap();
        assert_eq!(a, b);
        let v: serde_json::Value = serde_json::from_str(&a).unwrap();
        let n = v["model"]["vocab"].as_object().unwrap().len();
        assert!(n > 256 && n <= 320, "{n}");
        assert_eq!(tok.ids.endoftext as usize, n);
        assert_eq!(tok.ids.time_series_pad as usize, n + ADDED - 1);
        let text = "<think>\n</think>\n\\boxed{Nodule} 42";
        let ids = tok.encode(text).unwrap();
        assert!(ids.len() < text.len(), "no merge learnt: {ids:?}");
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
        assert!(train_bpe(&lines(), 100).is_err());
    }
}
