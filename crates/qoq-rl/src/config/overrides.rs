//! `--set key.path=value` overrides of a run document: splitting, value inference, and the
//! key check against the schema of the defaults.

use super::{ConfigError, Result, RunConfig};

/// Splits `key.path=value` at the first `=`.
pub fn split_override(arg: &str) -> Result<(&str, &str)> {
    let (k, v) = arg
        .split_once('=')
        .ok_or_else(|| ConfigError::BadOverride {
            key: arg.to_string(),
            reason: "expected key.path=value".into(),
        })?;
    let k = k.trim();
    if k.is_empty() || k.split('.').any(str::is_empty) {
        return Err(ConfigError::BadOverride {
            key: arg.to_string(),
            reason: "empty key segment".into(),
        });
    }
    Ok((k, v.trim()))
}

/// The TOML value of an override's text: `true`/`false`, an integer, a float (`1e-6`, `inf`),
/// an array (`[1, 2]`, `["a", "b"]`), a quoted string, else the text as a string.
pub fn infer_value(raw: &str) -> toml::Value {
    let t = raw.trim();
    if (t.starts_with('[') || t.starts_with('{') || t.starts_with('"') || t.starts_with('\''))
        && let Ok(toml::Value::Table(mut tab)) = toml::from_str::<toml::Value>(&format!("v = {t}"))
        && let Some(v) = tab.remove("v")
    {
        return v;
    }
    match t {
        "true" => return toml::Value::Boolean(true),
        "false" => return toml::Value::Boolean(false),
        _ => {}
    }
    match t {
        "inf" | "+inf" => return toml::Value::Float(f64::INFINITY),
        "-inf" => return toml::Value::Float(f64::NEG_INFINITY),
        "nan" => return toml::Value::Float(f64::NAN),
        _ => {}
    }
    if let Ok(i) = t.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    if t.parse::<f64>().is_ok()
        && t.chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'))
    {
        return toml::Value::Float(t.parse().unwrap());
    }
    toml::Value::String(t.to_string())
}

fn default_schema() -> toml::Value {
    toml::Value::try_from(RunConfig::default()).expect("the default config serialises to TOML")
}

/// Whether `path` names a key of the schema (the defaults) or of the document.
fn key_known(
    schema: &toml::Value,
    doc: &toml::Value,
    path: &[&str],
) -> std::result::Result<(), Vec<String>> {
    let (mut s, mut d) = (Some(schema), Some(doc));
    for seg in path {
        let next_s = s.and_then(|v| v.get(seg));
        let next_d = d.and_then(|v| v.get(seg));
        if next_s.is_none() && next_d.is_none() {
            let mut known: Vec<String> = Vec::new();
            for v in [s, d].into_iter().flatten() {
                if let Some(t) = v.as_table() {
                    known.extend(t.keys().cloned());
                }
            }
            known.sort();
            known.dedup();
            return Err(known);
        }
        (s, d) = (next_s, next_d);
    }
    Ok(())
}

/// Sets `key` (dotted path, e.g. `algorithm.estimator`) to the inferred value of `raw` in a run
/// document, creating intermediate tables. The key must exist in the schema (or already in the
/// document, for optional keys and tagged variants) unless the result still deserialises; an
/// unknown key is an error naming it, and a value of the wrong type an error naming the key.
/// An integer given for a float field is stored as a float.
pub fn apply_override(doc: &mut toml::Value, key: &str, raw: &str) -> Result<()> {
    match set_override(doc, key, raw, false)? {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

/// [`apply_override`] for one of several overrides applied together: a value that does not
/// leave a deserialisable document is set anyway and its error returned as `Some` (an unknown
/// key as [`ConfigError::UnknownKey`]), so that a later override can complete it (switching
/// `actor.optim.schedule.type` to `warmup_cosine` needs the `total_steps` a later override
/// gives); `None` means the document with this override deserialises.
pub(crate) fn apply_override_deferred(
    doc: &mut toml::Value,
    key: &str,
    raw: &str,
) -> Result<Option<ConfigError>> {
    set_override(doc, key, raw, true)
}

fn set_override(
    doc: &mut toml::Value,
    key: &str,
    raw: &str,
    defer: bool,
) -> Result<Option<ConfigError>> {
    let path: Vec<&str> = key.split('.').collect();
    if path.iter().any(|s| s.is_empty()) {
        return Err(ConfigError::BadOverride {
            key: key.to_string(),
            reason: "empty key segment".into(),
        });
    }
    if let Some((_, why)) = super::NOT_IMPLEMENTED.iter().find(|(k, _)| *k == key) {
        return Err(ConfigError::BadOverride {
            key: key.to_string(),
            reason: format!("not implemented: {why}"),
        });
    }
    let schema = default_schema();
    let known = key_known(&schema, doc, &path);
    let mut value = infer_value(raw);
    // An integer for a key whose default is a float.
    if let toml::Value::Integer(i) = value {
        let mut s = Some(&schema);
        for seg in &path {
            s = s.and_then(|v| v.get(seg));
        }
        if matches!(s, Some(toml::Value::Float(_))) {
            value = toml::Value::Float(i as f64);
        }
    }
    let mut candidate = doc.clone();
    {
        let mut cur = &mut candidate;
        for (i, seg) in path.iter().enumerate() {
            let table = cur.as_table_mut().ok_or_else(|| ConfigError::BadOverride {
                key: key.to_string(),
                reason: format!("`{}` is not a table", path[..i].join(".")),
            })?;
            if i + 1 == path.len() {
                table.insert(seg.to_string(), value.clone());
                break;
            }
            cur = table
                .entry(seg.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        }
    }
    match (
        RunConfig::from_value(candidate.clone(), "<override>"),
        known,
    ) {
        (Ok(_), _) => {
            *doc = candidate;
            Ok(None)
        }
        (Err(_), Err(known)) => {
            let e = ConfigError::UnknownKey {
                key: key.to_string(),
                known,
            };
            if defer {
                *doc = candidate;
                Ok(Some(e))
            } else {
                Err(e)
            }
        }
        (Err(e), Ok(())) => {
            let e = ConfigError::BadOverride {
                key: key.to_string(),
                reason: format!("value {raw:?} does not fit: {e}"),
            };
            if defer {
                *doc = candidate;
                Ok(Some(e))
            } else {
                Err(e)
            }
        }
    }
}

impl RunConfig {
    /// The `key.path=value` overrides that turn `base` into `self` (every leaf whose value
    /// differs, arrays compared whole), skipping the keys under the given prefixes: how a run
    /// file rerun on a folder with checkpoints continues the saved run with the file's current
    /// values (`trainer.find_last_checkpoint`). A key `self` leaves unset where `base` sets it
    /// cannot be written as an override and is an error naming it.
    pub fn overrides_from(&self, base: &RunConfig, skip: &[&str]) -> Result<Vec<String>> {
        let to_doc = |c: &RunConfig| {
            toml::Value::try_from(c).map_err(|e| ConfigError::Parse {
                origin: "a run configuration".into(),
                message: e.to_string(),
            })
        };
        let (want, have) = (to_doc(self)?, to_doc(base)?);
        let mut out = Vec::new();
        diff(&want, Some(&have), "", skip, &mut out)?;
        Ok(out)
    }
}

fn diff(
    want: &toml::Value,
    have: Option<&toml::Value>,
    path: &str,
    skip: &[&str],
    out: &mut Vec<String>,
) -> Result<()> {
    let skipped = |p: &str| {
        skip.iter()
            .any(|s| p == *s || p.starts_with(&format!("{s}.")))
    };
    let child = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    if skipped(path) {
        return Ok(());
    }
    match (want, have) {
        (toml::Value::Table(w), Some(toml::Value::Table(h))) => {
            for (k, v) in w {
                diff(v, h.get(k), &child(k), skip, out)?;
            }
            if let Some(p) = h
                .keys()
                .filter(|k| !w.contains_key(*k))
                .map(|k| child(k))
                .find(|p| !skipped(p))
            {
                return Err(ConfigError::BadOverride {
                    key: p,
                    reason: "set in the saved run, unset in the run file: an override cannot \
                             unset a key (use --resume, or another trainer.out_dir)"
                        .into(),
                });
            }
        }
        (toml::Value::Table(w), None) => {
            for (k, v) in w {
                diff(v, None, &child(k), skip, out)?;
            }
        }
        (w, h) if Some(w) == h => {}
        (w, _) => out.push(format!("{path}={w}")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_inferred_by_type() {
        assert_eq!(infer_value("true"), toml::Value::Boolean(true));
        assert_eq!(infer_value("12"), toml::Value::Integer(12));
        assert_eq!(infer_value("1e-6"), toml::Value::Float(1e-6));
        assert_eq!(infer_value("-1.5"), toml::Value::Float(-1.5));
        assert_eq!(infer_value("inf"), toml::Value::Float(f64::INFINITY));
        assert_eq!(infer_value("info"), toml::Value::String("info".into()));
        assert_eq!(infer_value("drpo"), toml::Value::String("drpo".into()));
        assert_eq!(infer_value("\"12\""), toml::Value::String("12".into()));
        assert_eq!(
            infer_value("[1, 2]"),
            toml::Value::Array(vec![toml::Value::Integer(1), toml::Value::Integer(2)])
        );
    }

    #[test]
    fn split_override_needs_an_equals_sign() {
        assert_eq!(split_override("a.b = 3").unwrap(), ("a.b", "3"));
        assert!(split_override("a.b").is_err());
        assert!(split_override("a..b=1").is_err());
    }
}
