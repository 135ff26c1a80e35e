//! String ops as the ONNX reference defines them: StringConcat (broadcasting), StringSplit (Python's
//! `str.split`: runs of whitespace without a delimiter, `maxsplit`, rows padded with ""), RegexFullMatch
//! (the `regex` crate, whose syntax is RE2's) and StringNormalizer (stop words, case change; the
//! reference's accent stripping of non-ASCII text by NFKD is not done, so accented input is an error
//! rather than a silent difference).

use super::elementwise::{bcast_offsets, broadcast_shape};
use super::{Ctx, R, one};
use crate::{Data, Tensor, Value};

fn strs<'t>(t: &'t Tensor, what: &str) -> R<&'t [String]> {
    match &t.data {
        Data::Str(v) => Ok(v),
        d => Err(format!("{what} must be a string tensor, got {}", d.dtype())),
    }
}

pub(crate) fn string_concat(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (x, y) = (ctx.t(0)?, ctx.t(1)?);
    let (a, b) = (strs(x, "X")?, strs(y, "Y")?);
    let shape = broadcast_shape(&x.shape, &y.shape)?;
    let (ia, ib) = (
        bcast_offsets(&x.shape, &shape),
        bcast_offsets(&y.shape, &shape),
    );
    let out = ia
        .iter()
        .zip(&ib)
        .map(|(&i, &j)| format!("{}{}", a[i], b[j]))
        .collect();
    one(Tensor::new(shape, Data::Str(out)))
}

/// Python's `s.split(sep, maxsplit)` (`maxsplit` None: no limit).
fn py_split(s: &str, sep: Option<&str>, maxsplit: Option<usize>) -> Vec<String> {
    match sep {
        Some(sep) => match maxsplit {
            Some(m) => s.splitn(m + 1, sep).map(str::to_string).collect(),
            None => s.split(sep).map(str::to_string).collect(),
        },
        None => {
            // runs of whitespace; leading and trailing whitespace give no empty parts, and the part left
            // after `maxsplit` splits keeps its inner whitespace but not its leading run
            let mut out = Vec::new();
            let mut rest = s.trim_start();
            while !rest.is_empty() {
                if maxsplit.is_some_and(|m| out.len() == m) {
                    out.push(rest.to_string());
                    break;
                }
                let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
                out.push(rest[..end].to_string());
                rest = rest[end..].trim_start();
            }
            out
        }
    }
}

pub(crate) fn string_split(ctx: &mut Ctx) -> R<Vec<Value>> {
    let x = ctx.t(0)?;
    let v = strs(x, "X")?;
    let delim = ctx.as_str("delimiter").filter(|d| !d.is_empty());
    let maxsplit = match ctx.has("maxsplit") {
        true => Some(usize::try_from(ctx.ai("maxsplit", 0)).map_err(|_| "maxsplit must be >= 0")?),
        false => None,
    };
    let parts: Vec<Vec<String>> = v
        .iter()
        .map(|s| py_split(s, delim.as_deref(), maxsplit))
        .collect();
    let width = parts.iter().map(Vec::len).max().unwrap_or(0);
    let counts: Vec<i64> = parts.iter().map(|p| p.len() as i64).collect();
    let mut y = Vec::with_capacity(parts.len() * width);
    for mut p in parts {
        p.resize(width, String::new());
        y.extend(p);
    }
    let mut shape = x.shape.clone();
    shape.push(width);
    Ok(vec![
        Value::Tensor(Tensor::new(shape, Data::Str(y))),
        Value::Tensor(Tensor::i64(x.shape.clone(), counts)),
    ])
}

pub(crate) fn regex_full_match(ctx: &mut Ctx) -> R<Vec<Value>> {
    let x = ctx.t(0)?;
    let v = strs(x, "X")?;
    let pattern = ctx
        .as_str("pattern")
        .ok_or("RegexFullMatch needs a pattern")?;
    let re = regex::Regex::new(&format!("^(?:{pattern})$"))
        .map_err(|e| format!("invalid pattern {pattern:?}: {e}"))?;
    one(Tensor::new(
        x.shape.clone(),
        Data::Bool(v.iter().map(|s| re.is_match(s)).collect()),
    ))
}

/// StringNormalizer as the reference computes it: in each string, the words (split on single spaces) that
/// are stop words are removed (before the case change when case-sensitive, after it otherwise, against
/// stop words changed the same way); then strings left empty are dropped, one "" remaining when none is
/// left. Inputs are `[C]` or `[1, C]`.
pub(crate) fn string_normalizer(ctx: &mut Ctx) -> R<Vec<Value>> {
    let x = ctx.t(0)?;
    let v = strs(x, "X")?;
    let two_d = match x.shape[..] {
        [_] => false,
        [1, _] => true,
        _ => {
            return Err(format!(
                "StringNormalizer takes [C] or [1, C], got {:?}",
                x.shape
            ));
        }
    };
    if let Some(s) = v.iter().find(|s| !s.is_ascii()) {
        return Err(format!(
            "StringNormalizer on non-ASCII text ({s:?}) needs accent stripping (NFKD), which is not implemented"
        ));
    }
    let action = ctx
        .as_str("case_change_action")
        .unwrap_or_else(|| "NONE".into());
    let change = |s: &str| -> R<String> {
        Ok(match action.as_str() {
            "LOWER" => s.to_lowercase(),
            "UPPER" => s.to_uppercase(),
            "NONE" => s.to_string(),
            a => return Err(format!("unknown case_change_action {a:?}")),
        })
    };
    let sensitive = ctx.ai("is_case_sensitive", 0) != 0;
    let raw = ctx.astrs("stopwords").unwrap_or_default();
    let stops: Vec<String> = if sensitive {
        raw
    } else {
        raw.iter().map(|w| change(w)).collect::<R<_>>()?
    };
    let drop_stops = |s: &str| -> String {
        s.split(' ')
            .filter(|w| !stops.iter().any(|t| t == w))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut out = Vec::with_capacity(v.len());
    for s in v {
        let s = if sensitive && !stops.is_empty() {
            change(&drop_stops(s))?
        } else {
            let c = change(s)?;
            if stops.is_empty() { c } else { drop_stops(&c) }
        };
        if !s.is_empty() {
            out.push(s);
        }
    }
    if out.is_empty() {
        out.push(String::new());
    }
    let shape = if two_d {
        vec![1, out.len()]
    } else {
        vec![out.len()]
    };
    one(Tensor::new(shape, Data::Str(out)))
}

#[cfg(test)]
mod tests {
    use super::py_split;

    fn split(s: &str, sep: Option<&str>, max: Option<usize>) -> Vec<String> {
        py_split(s, sep, max)
    }

    #[test]
    fn splits_as_python_does() {
        // whitespace runs: no empty parts; the rest after maxsplit loses its leading run only
        assert_eq!(split("  a \t b  c ", None, None), ["a", "b", "c"]);
        assert_eq!(split("  a   b  c ", None, Some(1)), ["a", "b  c "]);
        assert_eq!(split("   ", None, None), Vec::<String>::new());
        // a delimiter: empty parts kept
        assert_eq!(split(",a,,b", Some(","), None), ["", "a", "", "b"]);
        assert_eq!(split("a,b,c", Some(","), Some(1)), ["a", "b,c"]);
        assert_eq!(split("", Some(","), None), [""]);
    }
}
