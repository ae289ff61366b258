//! Reading predictions files: JSON Lines of [`Prediction`] (`response`, `answer`, `data_source`,
//! `dataset`, optional `iou`). Blank lines are skipped; any other line that does not parse is an
//! error naming the file and the 1-based line.

use crate::error::{Error, Result};
use crate::metrics::{MetricsAccumulator, Prediction};
use std::io::BufRead;
use std::path::Path;

/// Parse one line of a predictions file (`path` and `line` only name the place in errors).
/// Returns `None` for a blank line.
pub fn parse_prediction_line(text: &str, path: &Path, line: usize) -> Result<Option<Prediction>> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    let p: Prediction = serde_json::from_str(text).map_err(|e| Error::Line {
        path: path.to_path_buf(),
        line,
        message: e.to_string(),
    })?;
    if let Some(v) = p.iou
        && !v.is_finite()
    {
        return Err(Error::Field {
            path: path.to_path_buf(),
            line,
            field: "iou",
            message: format!("{v} is not a finite number"),
        });
    }
    Ok(Some(p))
}

/// Read every prediction of a JSONL file.
pub fn read_predictions(path: &Path) -> Result<Vec<Prediction>> {
    let mut out = Vec::new();
    for_each_prediction(path, |p| out.push(p))?;
    Ok(out)
}

/// Stream a JSONL file into `acc` without keeping the predictions; returns how many were read.
pub fn accumulate_file(path: &Path, acc: &mut MetricsAccumulator) -> Result<u64> {
    let mut n = 0;
    for_each_prediction(path, |p| {
        acc.push(&p);
        n += 1;
    })?;
    Ok(n)
}

fn for_each_prediction(path: &Path, mut f: impl FnMut(Prediction)) -> Result<()> {
    let io_err = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io_err)?;
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(io_err)?;
        if let Some(p) = parse_prediction_line(&line, path, i + 1)? {
            f(p);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_lines_name_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        std::fs::write(
            &path,
            "{\"response\":\"r\",\"answer\":\"a\",\"data_source\":\"s\",\"dataset\":\"d\"}\n\n{\"response\": 3}\n",
        )
        .unwrap();
        let err = read_predictions(&path).unwrap_err().to_string();
        assert!(err.contains("p.jsonl line 3"), "{err}");
        assert!(err.contains("malformed prediction"), "{err}");
    }

    #[test]
    fn optional_iou_is_read_and_null_means_absent() {
        let p = Path::new("x.jsonl");
        let a = parse_prediction_line(
            r#"{"response":"r","answer":"a","data_source":"s","dataset":"d","iou":0.25}"#,
            p,
            1,
        )
        .unwrap()
        .unwrap();
        assert_eq!(a.iou, Some(0.25));
        let b = parse_prediction_line(
            r#"{"response":"r","answer":"a","data_source":"s","dataset":"d","iou":null,"extra":1}"#,
            p,
            2,
        )
        .unwrap()
        .unwrap();
        assert_eq!(b.iou, None);
        assert!(parse_prediction_line("   ", p, 3).unwrap().is_none());
        let missing = parse_prediction_line(r#"{"response":"r","answer":"a"}"#, p, 4)
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("x.jsonl line 4") && missing.contains("data_source"),
            "{missing}"
        );
    }
}
