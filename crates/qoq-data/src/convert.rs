//! `qoq data convert`: CLIMB's LLaVA-style `annotation_{split}.jsonl` to the training schema.
//!
//! The reference release lacks this converter (spec §2.1, §15). A CLIMB row is
//! `{"images": [...], "conversations": [{"from": "human", "value": ...}, {"from": "gpt",
//! "value": ...}], "label": str | [str]}`; it becomes `{"problem": <first human turn>,
//! "answer": <label, lists joined with ", "; else the first gpt turn>, "images": [...]}` with any
//! other fields kept. `image_prefix` is prepended to every image path (to make them
//! `<data_source>/<dataset>/...` relative to the output manifest's folder).

use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::io::{BufRead, Write};
use std::path::Path;

/// Conversion counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConvertStats {
    pub converted: usize,
    /// (line, reason) of every row that could not be converted.
    pub skipped: Vec<(u64, String)>,
}

fn convert_row(row: Value, image_prefix: &str) -> std::result::Result<Value, String> {
    let Value::Object(mut row) = row else {
        return Err("a row must be a JSON object".into());
    };
    let turns = match row.remove("conversations") {
        Some(Value::Array(t)) => t,
        _ => return Err("missing `conversations` list".into()),
    };
    let turn = |who: &str| {
        turns.iter().find_map(|t| {
            (t.get("from").and_then(Value::as_str) == Some(who))
                .then(|| t.get("value").and_then(Value::as_str).map(str::to_string))
                .flatten()
        })
    };
    let problem = turn("human").ok_or("no `human` turn with a string `value`")?;
    let answer = match row.remove("label") {
        Some(Value::String(s)) => s,
        Some(Value::Array(items)) => {
            let labels: Option<Vec<String>> = items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect();
            labels.ok_or("`label` list must hold strings")?.join(", ")
        }
        Some(Value::Number(n)) => n.to_string(),
        _ => turn("gpt").ok_or("no `label` and no `gpt` turn to take the answer from")?,
    };
    let images: Vec<Value> = match row.remove("images").or_else(|| row.remove("image")) {
        Some(Value::Array(v)) => v,
        Some(Value::String(s)) => vec![Value::String(s)],
        None => Vec::new(),
        Some(_) => return Err("`images` must be a list of paths".into()),
    };
    let images = images
        .into_iter()
        .map(|v| match v {
            Value::String(s) if image_prefix.is_empty() => Ok(Value::String(s)),
            Value::String(s) => Ok(Value::String(format!(
                "{}/{}",
                image_prefix.trim_end_matches('/'),
                s.trim_start_matches('/')
            ))),
            _ => Err("`images` must be a list of paths".to_string()),
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let mut out = Map::new();
    out.insert("problem".into(), Value::String(problem));
    out.insert("answer".into(), Value::String(answer));
    out.insert("images".into(), Value::Array(images));
    out.extend(row);
    Ok(Value::Object(out))
}

/// Convert CLIMB annotation lines from `input` (named `source` in errors) to training rows on
/// `output`. Bad rows are skipped and listed; I/O errors abort.
pub fn convert_climb<R: BufRead, W: Write>(
    input: R,
    source: &Path,
    image_prefix: &str,
    mut output: W,
) -> Result<ConvertStats> {
    let mut stats = ConvertStats::default();
    for (i, line) in input.lines().enumerate() {
        let line_no = i as u64 + 1;
        let line = line.map_err(|e| Error::io(source, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let converted = serde_json::from_str::<Value>(&line)
            .map_err(|e| format!("malformed JSON: {e}"))
            .and_then(|v| convert_row(v, image_prefix));
        match converted {
            Ok(v) => {
                serde_json::to_writer(&mut output, &v).map_err(|e| Error::io(source, e.into()))?;
                output.write_all(b"\n").map_err(|e| Error::io(source, e))?;
                stats.converted += 1;
            }
            Err(reason) => stats.skipped.push((line_no, reason)),
        }
    }
    output.flush().map_err(|e| Error::io(source, e))?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{ManifestConfig, parse_row};
    use qoq_core::Domain;

    #[test]
    fn climb_rows_become_training_rows_that_the_reader_accepts() {
        let input = concat!(
            r#"{"images": ["vindr/a.png"], "conversations": [{"from": "human", "value": "<image>\nAbove is a chest X-ray image of a patient. What is the diagnosis?"}, {"from": "gpt", "value": "Nodule"}], "label": ["Nodule", "Effusion"], "split": "train"}"#,
            "\n",
            r#"{"images": ["vindr/b.png"], "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "No Finding"}]}"#,
            "\n\n",
            r#"{"images": ["x.png"], "conversations": []}"#,
            "\n",
            r#"{broken"#,
            "\n"
        );
        let mut out = Vec::new();
        let stats = convert_climb(
            input.as_bytes(),
            Path::new("ann.jsonl"),
            "chest_xray",
            &mut out,
        )
        .unwrap();
        assert_eq!(stats.converted, 2);
        let lines: Vec<u64> = stats.skipped.iter().map(|s| s.0).collect();
        assert_eq!(lines, vec![4, 5]);
        let text = String::from_utf8(out).unwrap();
        let rows: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(rows[0]["answer"], "Nodule, Effusion");
        assert_eq!(rows[0]["split"], "train");
        assert_eq!(rows[1]["answer"], "No Finding");
        let s = parse_row(
            rows[0].clone(),
            &ManifestConfig::default(),
            Path::new("/d"),
            "m",
            1,
        )
        .unwrap();
        assert_eq!(
            (s.data_source, s.dataset.as_str()),
            (Domain::ChestXray, "vindr")
        );
    }
}
