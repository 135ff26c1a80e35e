//! String and token ops as the ONNX reference defines them: StringConcat (broadcasting), StringSplit
//! (Python's `str.split`: runs of whitespace without a delimiter, `maxsplit`, rows padded with ""),
//! RegexFullMatch (the `regex` crate, whose syntax is RE2's), StringNormalizer (stop words, case change;
//! the reference's accent stripping of non-ASCII text by NFKD is not done, so accented input is an error
//! rather than a silent difference) and TfIdfVectorizer (n-gram counts over integer or string tokens).

use std::collections::HashMap;

use super::elementwise::{bcast_offsets, broadcast_shape};
use super::ml::{Key, keys_of};
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

/// TfIdfVectorizer as the reference counts: the pool's n-grams (sizes 1.. in `ngram_counts` blocks) are
/// numbered from 1 in pool order, those within [min_gram_length, max_gram_length] registered; each row is
/// scanned for every skip distance 1..=max_skip_count+1 from every start, extending an n-gram while it is a
/// prefix of a registered one and counting each registered one it reaches (unigrams on the first distance
/// only). TF gives the counts, IDF the weights (or 1) where a count is non-zero, TFIDF weights times counts.
pub(crate) fn tfidf_vectorizer(ctx: &mut Ctx) -> R<Vec<Value>> {
    let x = ctx.t(0)?;
    // tokens are integers or strings (the schema allows no floats)
    let items = keys_of(x)?;
    let (rows, c, batched) = match x.shape[..] {
        [] => (1, 1, false),
        [c] => (1, c, false),
        [b, c] if b > 0 => (b, c, true),
        _ => {
            return Err(format!(
                "TfIdfVectorizer takes [C] or [B, C], got {:?}",
                x.shape
            ));
        }
    };
    let pool: Vec<Key> = match (ctx.ais("pool_int64s"), ctx.astrs("pool_strings")) {
        (Some(v), _) if !v.is_empty() => v.into_iter().map(Key::I).collect(),
        (_, Some(v)) => v.into_iter().map(Key::S).collect(),
        _ => Vec::new(),
    };
    let (min_n, max_n) = (
        ctx.ai("min_gram_length", 1).max(1) as usize,
        ctx.ai("max_gram_length", 1).max(1) as usize,
    );
    let max_skip = ctx.ai("max_skip_count", 0).max(0) as usize;
    let counts = ctx.ais("ngram_counts").unwrap_or_default();
    let indexes = ctx.ais("ngram_indexes").unwrap_or_default();
    let weights = ctx.afs("weights").unwrap_or_default();
    let out_size = indexes.iter().copied().max().map_or(0, |m| m.max(-1) + 1) as usize;
    // registered n-grams -> id, and every prefix of one
    let mut ids: HashMap<Vec<Key>, usize> = HashMap::new();
    let mut prefixes: std::collections::HashSet<Vec<Key>> = std::collections::HashSet::new();
    let mut id = 1;
    for (k, &start) in counts.iter().enumerate() {
        let size = k + 1;
        let end = counts.get(k + 1).copied().unwrap_or(pool.len() as i64);
        let (start, end) = (start.max(0) as usize, (end.max(0) as usize).min(pool.len()));
        let n = end.saturating_sub(start) / size;
        for g in 0..n {
            if (min_n..=max_n).contains(&size) {
                let gram = pool[start + g * size..start + (g + 1) * size].to_vec();
                for p in 1..=size {
                    prefixes.insert(gram[..p].to_vec());
                }
                ids.insert(gram, id);
            }
            id += 1;
        }
    }
    let mut freq = vec![0i64; rows * out_size];
    for r in 0..rows {
        let row = &items[r * c..(r + 1) * c];
        let mut start_n = min_n;
        for skip in 1..=max_skip + 1 {
            for s in 0..c {
                if s + skip * (start_n - 1) >= c {
                    break;
                }
                let mut gram: Vec<Key> = Vec::new();
                let mut at = s;
                while gram.len() < max_n && at < c {
                    gram.push(row[at].clone());
                    if !prefixes.contains(&gram) {
                        break;
                    }
                    if gram.len() >= start_n
                        && let Some(&g) = ids.get(&gram)
                    {
                        let slot = indexes
                            .get(g - 1)
                            .and_then(|&i| usize::try_from(i).ok())
                            .filter(|&i| i < out_size)
                            .ok_or_else(|| format!("n-gram {g} has no output index"))?;
                        freq[r * out_size + slot] += 1;
                    }
                    at += skip;
                }
            }
            if start_n == 1 {
                start_n = 2;
                if start_n > max_n {
                    break;
                }
            }
        }
    }
    let mode = ctx.as_str("mode").unwrap_or_else(|| "TF".into());
    let y: Vec<f32> = freq
        .iter()
        .enumerate()
        .map(|(p, &f)| {
            let w = weights.get(p % out_size.max(1)).copied();
            Ok(match (mode.as_str(), w) {
                ("TF", _) | ("TFIDF", None) => f as f32,
                ("IDF", Some(w)) => {
                    if f > 0 {
                        w
                    } else {
                        0.0
                    }
                }
                ("IDF", None) => {
                    if f > 0 {
                        1.0
                    } else {
                        0.0
                    }
                }
                ("TFIDF", Some(w)) => w * f as f32,
                (m, _) => return Err(format!("unknown TfIdfVectorizer mode {m:?}")),
            })
        })
        .collect::<R<_>>()?;
    let shape = if batched {
        vec![rows, out_size]
    } else {
        vec![out_size]
    };
    one(Tensor::f32(shape, y))
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
