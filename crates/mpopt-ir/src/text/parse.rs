//! The parser: the inverse of [`super::print_model`] (trailing `; notes` are comments and are dropped).

use bytes::Bytes;

use crate::{
    AttrValue, Attribute, DType, Dim, DimValue, Function, Graph, Model, Node, OpsetImport,
    SparseTensor, Tensor, TensorData, Type, TypeInfo, ValueId,
};

/// A syntax or resolution error, with its 1-based line and column.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}:{col}: {message}")]
pub struct ParseError {
    /// Line (1-based).
    pub line: usize,
    /// Column (1-based, in characters).
    pub col: usize,
    /// What is wrong.
    pub message: String,
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Value(String),
    At(String),
    Ident(String),
    Num(String),
    Str(Vec<u8>),
    Angle(String),
    Arrow,
    ColonColon,
    Ellipsis,
    P(char),
    Eof,
}

type Spanned = (Tok, usize, usize);

fn err(line: usize, col: usize, message: String) -> ParseError {
    ParseError { line, col, message }
}

/// Splits the source into tokens with their positions.
fn lex(src: &str) -> Result<Vec<Spanned>, ParseError> {
    let chars: Vec<char> = src.chars().collect();
    let mut lx = Lex {
        chars: &chars,
        i: 0,
        line: 1,
        col: 1,
    };
    let mut toks = Vec::new();
    while let Some(c) = lx.peek() {
        let (l0, c0) = (lx.line, lx.col);
        if c == '\n' {
            lx.i += 1;
            lx.line += 1;
            lx.col = 1;
            continue;
        }
        if c.is_whitespace() {
            lx.bump(1);
            continue;
        }
        if c == ';' {
            while lx.peek().is_some_and(|c| c != '\n') {
                lx.bump(1);
            }
            continue;
        }
        let tok = match c {
            '%' | '@' => {
                lx.bump(1);
                let name = if lx.peek() == Some('"') {
                    String::from_utf8(lx.string()?)
                        .map_err(|_| err(l0, c0, "name is not UTF-8".into()))?
                } else {
                    lx.take_while(|c| {
                        c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-')
                    })
                };
                if name.is_empty() {
                    return Err(err(l0, c0, format!("empty name after '{c}'")));
                }
                if c == '%' {
                    Tok::Value(name)
                } else {
                    Tok::At(name)
                }
            }
            '"' => Tok::Str(lx.string()?),
            '<' => {
                lx.bump(1);
                let inner = lx.take_while(|c| c != '>' && c != '\n');
                if lx.peek() != Some('>') {
                    return Err(err(l0, c0, "unterminated '<'".into()));
                }
                lx.bump(1);
                Tok::Angle(inner)
            }
            '-' if lx.at(1) == Some('>') => {
                lx.bump(2);
                Tok::Arrow
            }
            ':' if lx.at(1) == Some(':') => {
                lx.bump(2);
                Tok::ColonColon
            }
            '.' if lx.at(1) == Some('.') && lx.at(2) == Some('.') => {
                lx.bump(3);
                Tok::Ellipsis
            }
            c if c.is_ascii_digit()
                || (c == '-' && lx.at(1).is_some_and(|d| d.is_ascii_alphanumeric())) =>
            {
                let s = lx.i;
                lx.bump(1);
                while let Some(c) = lx.peek() {
                    let exp_sign = matches!(c, '+' | '-') && matches!(chars[lx.i - 1], 'e' | 'E');
                    if c.is_ascii_alphanumeric() || c == '.' || exp_sign {
                        lx.bump(1);
                    } else {
                        break;
                    }
                }
                Tok::Num(chars[s..lx.i].iter().collect())
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                Tok::Ident(lx.take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.')))
            }
            '(' | ')' | '{' | '}' | '[' | ']' | ',' | '=' | ':' | '?' => {
                lx.bump(1);
                Tok::P(c)
            }
            c => return Err(err(l0, c0, format!("unexpected character '{c}'"))),
        };
        toks.push((tok, l0, c0));
    }
    toks.push((Tok::Eof, lx.line, lx.col));
    Ok(toks)
}

struct Lex<'a> {
    chars: &'a [char],
    i: usize,
    line: usize,
    col: usize,
}

impl Lex<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.i).copied()
    }
    fn at(&self, k: usize) -> Option<char> {
        self.chars.get(self.i + k).copied()
    }
    fn bump(&mut self, n: usize) {
        self.i += n;
        self.col += n;
    }
    fn take_while(&mut self, f: impl Fn(char) -> bool) -> String {
        let s = self.i;
        while self.peek().is_some_and(&f) {
            self.bump(1);
        }
        self.chars[s..self.i].iter().collect()
    }
    /// A quoted string, starting at the opening quote.
    fn string(&mut self) -> Result<Vec<u8>, ParseError> {
        let (l0, c0) = (self.line, self.col);
        let mut out = Vec::new();
        self.bump(1);
        loop {
            let Some(c) = self.peek() else {
                return Err(err(l0, c0, "unterminated string".into()));
            };
            if c == '\n' {
                return Err(err(l0, c0, "unterminated string".into()));
            }
            self.bump(1);
            match c {
                '"' => return Ok(out),
                '\\' => {
                    let e = self.peek().unwrap_or(' ');
                    self.bump(1);
                    match e {
                        'n' => out.push(b'\n'),
                        't' => out.push(b'\t'),
                        '"' => out.push(b'"'),
                        '\\' => out.push(b'\\'),
                        'x' => {
                            let h: String = self
                                .chars
                                .get(self.i..self.i + 2)
                                .map(|s| s.iter().collect())
                                .unwrap_or_default();
                            let b = u8::from_str_radix(&h, 16)
                                .map_err(|_| err(l0, c0, format!("bad escape \\x{h}")))?;
                            out.push(b);
                            self.bump(2);
                        }
                        e => return Err(err(l0, c0, format!("unknown escape \\{e}"))),
                    }
                }
                c => {
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
        }
    }
}

struct P {
    toks: Vec<Spanned>,
    pos: usize,
}

type R<T> = Result<T, ParseError>;

/// A node statement before name resolution.
struct NodeStmt {
    outs: Vec<Option<String>>,
    ins: Vec<Option<String>>,
    node: Node,
    types: Vec<Option<TypeInfo>>,
    at: (usize, usize),
}

enum Stmt {
    Const(String, Tensor, (usize, usize)),
    Sparse(String, SparseTensor, (usize, usize)),
    Node(NodeStmt),
}

type Params = Vec<(String, Option<TypeInfo>, (usize, usize))>;

impl P {
    fn peek(&self) -> &Tok {
        &self.toks[self.pos].0
    }
    fn here(&self) -> (usize, usize) {
        (self.toks[self.pos].1, self.toks[self.pos].2)
    }
    fn fail<T>(&self, m: impl Into<String>) -> R<T> {
        let (line, col) = self.here();
        Err(err(line, col, m.into()))
    }
    fn next(&mut self) -> Tok {
        let t = self.toks[self.pos].0.clone();
        if self.pos + 1 < self.toks.len() {
            self.pos += 1;
        }
        t
    }
    fn eat(&mut self, t: &Tok) -> bool {
        if self.peek() == t {
            self.next();
            true
        } else {
            false
        }
    }
    fn expect(&mut self, t: Tok, what: &str) -> R<()> {
        if self.eat(&t) {
            Ok(())
        } else {
            self.fail(format!("expected {what}, found {:?}", self.peek()))
        }
    }
    fn p(&mut self, c: char) -> R<()> {
        self.expect(Tok::P(c), &format!("'{c}'"))
    }
    fn is_kw(&self, k: &str) -> bool {
        matches!(self.peek(), Tok::Ident(s) if s == k)
    }
    fn keyword(&mut self, k: &str) -> R<()> {
        if self.is_kw(k) {
            self.next();
            Ok(())
        } else {
            self.fail(format!("expected '{k}', found {:?}", self.peek()))
        }
    }
    fn ident(&mut self) -> R<String> {
        match self.peek().clone() {
            Tok::Ident(s) => {
                self.next();
                Ok(s)
            }
            t => self.fail(format!("expected a name, found {t:?}")),
        }
    }
    fn string(&mut self) -> R<String> {
        match self.peek().clone() {
            Tok::Str(b) => {
                self.next();
                Ok(String::from_utf8_lossy(&b).into_owned())
            }
            t => self.fail(format!("expected a string, found {t:?}")),
        }
    }
    fn int(&mut self) -> R<i64> {
        match self.peek().clone() {
            Tok::Num(s) => match s.parse() {
                Ok(n) => {
                    self.next();
                    Ok(n)
                }
                Err(_) => self.fail(format!("expected an integer, found '{s}'")),
            },
            t => self.fail(format!("expected an integer, found {t:?}")),
        }
    }
    fn domain(&mut self) -> R<String> {
        match self.peek().clone() {
            Tok::Ident(s) => {
                self.next();
                Ok(if s == "ai.onnx" { String::new() } else { s })
            }
            Tok::Str(_) => self.string(),
            t => self.fail(format!("expected a domain, found {t:?}")),
        }
    }
    /// Comma-separated items up to the closing `close`, which is consumed.
    fn seq<T>(&mut self, close: char, mut item: impl FnMut(&mut P) -> R<T>) -> R<Vec<T>> {
        let mut v = Vec::new();
        while !self.eat(&Tok::P(close)) {
            v.push(item(self)?);
            if !self.eat(&Tok::P(',')) {
                self.p(close)?;
                break;
            }
        }
        Ok(v)
    }

    fn opsets(&mut self) -> R<Vec<OpsetImport>> {
        let mut v = Vec::new();
        while matches!(self.peek(), Tok::Ident(_) | Tok::Str(_)) {
            let domain = self.domain()?;
            let version = self.int()?;
            v.push(OpsetImport { domain, version });
            if !self.eat(&Tok::P(',')) {
                break;
            }
        }
        Ok(v)
    }

    fn elem(&mut self) -> R<Option<DType>> {
        let s = self.ident()?;
        if s == "undef" {
            return Ok(None);
        }
        match DType::from_short_name(&s) {
            Some(d) => Ok(Some(d)),
            None => {
                self.pos -= 1;
                self.fail(format!("unknown dtype '{s}'"))
            }
        }
    }

    fn shape(&mut self) -> R<Option<Vec<Dim>>> {
        self.p('[')?;
        if self.eat(&Tok::Ellipsis) {
            self.p(']')?;
            return Ok(None);
        }
        let dims = self.seq(']', |p| {
            let value = match p.peek().clone() {
                Tok::Num(_) => DimValue::Known(p.int()?),
                Tok::Ident(s) => {
                    p.next();
                    DimValue::Symbol(s)
                }
                Tok::Str(_) => DimValue::Symbol(p.string()?),
                Tok::P('?') => {
                    p.next();
                    DimValue::Unknown
                }
                t => return p.fail(format!("expected a dimension, found {t:?}")),
            };
            Ok(Dim {
                value,
                denotation: None,
            })
        })?;
        Ok(Some(dims))
    }

    fn ty(&mut self) -> R<TypeInfo> {
        let ti = |ty| TypeInfo {
            ty,
            denotation: None,
        };
        if self.eat(&Tok::P('?')) {
            return Ok(ti(Type::Unset));
        }
        let inner = |p: &mut P| -> R<Option<Box<TypeInfo>>> {
            p.p('(')?;
            let t = if p.eat(&Tok::P('?')) {
                None
            } else {
                Some(Box::new(p.ty()?))
            };
            p.p(')')?;
            Ok(t)
        };
        let kw = match self.peek() {
            Tok::Ident(k) => k.clone(),
            t => return self.fail(format!("expected a type, found {t:?}")),
        };
        match kw.as_str() {
            "seq" => {
                self.next();
                Ok(ti(Type::Sequence(inner(self)?)))
            }
            "opt" => {
                self.next();
                Ok(ti(Type::Optional(inner(self)?)))
            }
            "map" => {
                self.next();
                self.p('(')?;
                let key = self.elem()?;
                self.p(',')?;
                let value = if self.eat(&Tok::P('?')) {
                    None
                } else {
                    Some(Box::new(self.ty()?))
                };
                self.p(')')?;
                Ok(ti(Type::Map { key, value }))
            }
            "sparse" => {
                self.next();
                let elem = self.elem()?;
                Ok(ti(Type::SparseTensor {
                    elem,
                    shape: self.shape()?,
                }))
            }
            "opaque" => {
                self.next();
                self.p('(')?;
                let domain = self.string()?;
                self.p(',')?;
                let name = self.string()?;
                self.p(')')?;
                Ok(ti(Type::Opaque { domain, name }))
            }
            _ => {
                let elem = self.elem()?;
                Ok(ti(Type::Tensor {
                    elem,
                    shape: self.shape()?,
                }))
            }
        }
    }

    fn dims(&mut self) -> R<Vec<i64>> {
        self.p('[')?;
        self.seq(']', |p| p.int())
    }

    /// `f32[2] [1.0, 2.0]`, `f32[64] <256 bytes>`, `f32[4] <elided>`
    fn tensor(&mut self) -> R<Tensor> {
        let (line, col) = self.here();
        let Some(dtype) = self.elem()? else {
            return self.fail("a tensor needs a dtype");
        };
        let dims = self.dims()?;
        let mut t = Tensor::from_raw(dtype, dims, Bytes::new());
        if let Tok::Angle(_) = self.peek() {
            self.next();
            t.data = TensorData::Elided;
            return Ok(t);
        }
        self.p('[')?;
        let items = self.seq(']', |p| Ok(p.next()))?;
        let bad = |m: String| err(line, col, m);
        if dtype == DType::Str {
            let mut v = Vec::new();
            for it in items {
                match it {
                    Tok::Str(b) => v.push(Bytes::from(b)),
                    t => return Err(bad(format!("expected a string element, found {t:?}"))),
                }
            }
            t.data = TensorData::Strings(v);
        } else {
            let mut raw = Vec::new();
            for it in items {
                let s = match it {
                    Tok::Num(s) | Tok::Ident(s) => s,
                    t => return Err(bad(format!("expected a number, found {t:?}"))),
                };
                encode_element(dtype, &s, &mut raw).map_err(bad)?;
            }
            t.data = TensorData::Raw(Bytes::from(raw));
        }
        t.check_len()
            .map_err(|e| bad(format!("tensor values: {e}")))?;
        Ok(t)
    }

    fn sparse(&mut self) -> R<SparseTensor> {
        self.keyword("sparse")?;
        self.p('(')?;
        let dims = self.dims()?;
        self.p(',')?;
        self.keyword("values")?;
        self.p('=')?;
        let values = self.tensor()?;
        self.p(',')?;
        self.keyword("indices")?;
        self.p('=')?;
        let indices = self.tensor()?;
        self.p(')')?;
        Ok(SparseTensor {
            values,
            indices,
            dims,
        })
    }

    fn attr_value(&mut self) -> R<AttrValue> {
        match self.peek().clone() {
            Tok::Num(s) => {
                if is_float_text(&s) {
                    match parse_f32(&s) {
                        Some(f) => {
                            self.next();
                            Ok(AttrValue::Float(f))
                        }
                        None => self.fail(format!("bad float '{s}'")),
                    }
                } else {
                    Ok(AttrValue::Int(self.int()?))
                }
            }
            Tok::Ident(s) if s == "inf" || s == "nan" => {
                self.next();
                Ok(AttrValue::Float(parse_f32(&s).expect("inf and nan parse")))
            }
            Tok::Str(b) => {
                self.next();
                Ok(AttrValue::String(Bytes::from(b)))
            }
            Tok::Ident(k) if k == "tensor" => {
                self.next();
                Ok(AttrValue::Tensor(Box::new(self.tensor()?)))
            }
            Tok::Ident(k) if k == "type" => {
                self.next();
                Ok(AttrValue::Type(self.ty()?))
            }
            Tok::Ident(k) if k == "sparse" => Ok(AttrValue::SparseTensor(Box::new(self.sparse()?))),
            Tok::Ident(k) if k == "graph" => Ok(AttrValue::Graph(Box::new(self.graph(false)?))),
            Tok::Ident(k) => {
                // An empty list of a named kind: `ints []`.
                let Some(v) = empty_list(&k) else {
                    return self.fail(format!("unknown attribute kind '{k}'"));
                };
                self.next();
                self.p('[')?;
                self.p(']')?;
                Ok(v)
            }
            Tok::P('[') => {
                self.next();
                let items = self.seq(']', |p| p.attr_value())?;
                self.list(items)
            }
            t => self.fail(format!("expected an attribute value, found {t:?}")),
        }
    }

    fn list(&self, items: Vec<AttrValue>) -> R<AttrValue> {
        fn all<T>(items: Vec<AttrValue>, f: impl Fn(AttrValue) -> Option<T>) -> Option<Vec<T>> {
            items.into_iter().map(f).collect()
        }
        let any_float = items.iter().any(|i| matches!(i, AttrValue::Float(_)));
        let out = match items.first() {
            None => None,
            Some(AttrValue::Float(_) | AttrValue::Int(_)) if any_float => all(items, |i| match i {
                AttrValue::Float(f) => Some(f),
                AttrValue::Int(n) => Some(n as f32),
                _ => None,
            })
            .map(AttrValue::Floats),
            Some(AttrValue::Int(_)) => all(items, |i| {
                if let AttrValue::Int(n) = i {
                    Some(n)
                } else {
                    None
                }
            })
            .map(AttrValue::Ints),
            Some(AttrValue::String(_)) => all(items, |i| {
                if let AttrValue::String(s) = i {
                    Some(s)
                } else {
                    None
                }
            })
            .map(AttrValue::Strings),
            Some(AttrValue::Tensor(_)) => all(items, |i| {
                if let AttrValue::Tensor(t) = i {
                    Some(*t)
                } else {
                    None
                }
            })
            .map(AttrValue::Tensors),
            Some(AttrValue::Graph(_)) => all(items, |i| {
                if let AttrValue::Graph(g) = i {
                    Some(*g)
                } else {
                    None
                }
            })
            .map(AttrValue::Graphs),
            Some(AttrValue::SparseTensor(_)) => all(items, |i| {
                if let AttrValue::SparseTensor(s) = i {
                    Some(*s)
                } else {
                    None
                }
            })
            .map(AttrValue::SparseTensors),
            Some(AttrValue::Type(_)) => all(items, |i| {
                if let AttrValue::Type(t) = i {
                    Some(t)
                } else {
                    None
                }
            })
            .map(AttrValue::Types),
            Some(_) => None,
        };
        match out {
            Some(v) => Ok(v),
            None => self.fail("a list must hold one kind of value; write an empty one as `ints []`, `floats []`, ..."),
        }
    }

    fn attrs(&mut self) -> R<Vec<Attribute>> {
        if !self.eat(&Tok::P('{')) {
            return Ok(Vec::new());
        }
        self.seq('}', |p| {
            let name = p.ident()?;
            p.p('=')?;
            if p.is_kw("ref") {
                p.next();
                let r = p.string()?;
                let kind = p.ident()?;
                let Some(value) = AttrValue::placeholder(&kind) else {
                    return p.fail(format!("unknown attribute kind '{kind}'"));
                };
                Ok(Attribute {
                    name,
                    value,
                    ref_attr_name: Some(r),
                    doc_string: String::new(),
                })
            } else {
                Ok(Attribute::new(name, p.attr_value()?))
            }
        })
    }

    fn params(&mut self, typed: bool) -> R<Params> {
        self.p('(')?;
        self.seq(')', |p| {
            let at = p.here();
            let name = match p.peek().clone() {
                Tok::Value(n) => {
                    p.next();
                    n
                }
                t => return p.fail(format!("expected a %value, found {t:?}")),
            };
            let ty = if typed && p.eat(&Tok::P(':')) {
                let t = p.ty()?;
                if t.ty == Type::Unset { None } else { Some(t) }
            } else {
                None
            };
            Ok((name, ty, at))
        })
    }

    fn name_or_none(&mut self) -> R<Option<String>> {
        match self.peek().clone() {
            Tok::Value(n) => {
                self.next();
                Ok(Some(n))
            }
            Tok::Ident(s) if s == "_" => {
                self.next();
                Ok(None)
            }
            t => self.fail(format!("expected a %value or _, found {t:?}")),
        }
    }

    fn stmts(&mut self) -> R<Vec<Stmt>> {
        let mut out = Vec::new();
        while !self.eat(&Tok::P('}')) {
            let at = self.here();
            let mut outs = Vec::new();
            if matches!(self.peek(), Tok::Value(_)) || self.is_kw("_") {
                loop {
                    outs.push(self.name_or_none()?);
                    if !self.eat(&Tok::P(',')) {
                        break;
                    }
                }
                self.p('=')?;
            }
            if self.is_kw("const") {
                self.next();
                let name = match outs.as_slice() {
                    [Some(n)] => n.clone(),
                    _ => return self.fail("`const` defines exactly one %value"),
                };
                if self.is_kw("sparse") {
                    out.push(Stmt::Sparse(name, self.sparse()?, at));
                } else {
                    let mut t = self.tensor()?;
                    t.name = name.clone();
                    out.push(Stmt::Const(name, t, at));
                }
                continue;
            }
            let (domain, op) = match self.peek().clone() {
                Tok::Ident(a) => {
                    self.next();
                    if self.eat(&Tok::ColonColon) {
                        (a, self.ident()?)
                    } else {
                        (String::new(), a)
                    }
                }
                Tok::Str(_) => {
                    let d = self.string()?;
                    self.expect(Tok::ColonColon, "'::'")?;
                    (d, self.ident()?)
                }
                Tok::Eof => return self.fail("unexpected end of input: missing '}'"),
                t => return self.fail(format!("expected an operator, found {t:?}")),
            };
            self.p('(')?;
            let ins = self.seq(')', |p| p.name_or_none())?;
            let mut node = Node::new(op);
            node.domain = domain;
            node.attributes = self.attrs()?;
            let mut types = vec![None; outs.len()];
            if self.eat(&Tok::P(':')) {
                types.clear();
                loop {
                    let t = self.ty()?;
                    types.push(if t.ty == Type::Unset { None } else { Some(t) });
                    if !self.eat(&Tok::P(',')) {
                        break;
                    }
                }
                if types.len() != outs.len() {
                    return self.fail(format!(
                        "{} output types for {} outputs",
                        types.len(),
                        outs.len()
                    ));
                }
            }
            if let Tok::At(n) = self.peek().clone() {
                self.next();
                node.name = n;
            }
            out.push(Stmt::Node(NodeStmt {
                outs,
                ins,
                node,
                types,
                at,
            }));
        }
        Ok(out)
    }

    fn graph(&mut self, top: bool) -> R<Graph> {
        self.keyword("graph")?;
        let name = match self.peek().clone() {
            Tok::At(n) => {
                self.next();
                n
            }
            t => return self.fail(format!("expected @name, found {t:?}")),
        };
        let inputs = self.params(true)?;
        self.expect(Tok::Arrow, "'->'")?;
        let outputs = self.params(true)?;
        let captures = if self.is_kw("captures") {
            self.next();
            self.params(true)?
        } else {
            Vec::new()
        };
        self.p('{')?;
        let stmts = self.stmts()?;
        let mut g = Graph::new(name);
        build(&mut g, inputs, captures, stmts, outputs, top)?;
        Ok(g)
    }

    fn function(&mut self) -> R<Function> {
        self.keyword("func")?;
        let domain = self.domain()?;
        self.expect(Tok::ColonColon, "'::'")?;
        let name = self.ident()?;
        let inputs = self.params(false)?;
        self.expect(Tok::Arrow, "'->'")?;
        let outputs = self.params(false)?;
        let (mut attributes, mut attribute_defaults) = (Vec::new(), Vec::new());
        if self.is_kw("attrs") {
            self.next();
            self.p('(')?;
            self.seq(')', |p| {
                let a = p.ident()?;
                if p.eat(&Tok::P('=')) {
                    let v = p.attr_value()?;
                    attribute_defaults.push(Attribute::new(a, v));
                } else {
                    attributes.push(a);
                }
                Ok(())
            })?;
        }
        self.keyword("opset")?;
        self.p('(')?;
        let opset_imports = self.opsets()?;
        self.p(')')?;
        self.p('{')?;
        let stmts = self.stmts()?;
        let mut body = Graph::new(name.clone());
        build(&mut body, inputs, Vec::new(), stmts, outputs, true)?;
        Ok(Function {
            name,
            domain,
            overload: String::new(),
            attributes,
            attribute_defaults,
            body,
            opset_imports,
            doc_string: String::new(),
            metadata_props: Vec::new(),
        })
    }
}

/// Builds a graph from parsed pieces, resolving names as the ONNX importer does: constants and node outputs
/// are defined first, then every use is resolved in this scope (or its declared captures).
fn build(
    g: &mut Graph,
    inputs: Params,
    captures: Params,
    stmts: Vec<Stmt>,
    outputs: Params,
    top: bool,
) -> R<()> {
    let e = |(line, col): (usize, usize), m: String| err(line, col, m);
    for (n, ty, at) in inputs {
        g.add_input(n, ty).map_err(|x| e(at, x.to_string()))?;
    }
    for (n, ty, at) in captures {
        let v = g.add_capture(n).map_err(|x| e(at, x.to_string()))?;
        g.value_mut(v).ty = ty;
    }
    let mut outs: Vec<Vec<Option<ValueId>>> = Vec::new();
    for s in &stmts {
        match s {
            Stmt::Const(n, t, at) => {
                let v = match g.value_by_name(n) {
                    Some(v) if g.inputs().contains(&v) => v,
                    _ => g
                        .add_value(n.clone(), None)
                        .map_err(|x| e(*at, x.to_string()))?,
                };
                if g.value(v).ty.is_none() {
                    let shape = t.dims.iter().map(|&d| Dim::known(d)).collect();
                    g.value_mut(v).ty = Some(TypeInfo::tensor(t.dtype, Some(shape)));
                }
                g.set_initializer(v, t.clone())
                    .map_err(|x| e(*at, x.to_string()))?;
            }
            Stmt::Sparse(n, s, at) => {
                let v = g
                    .add_value(n.clone(), None)
                    .map_err(|x| e(*at, x.to_string()))?;
                g.set_sparse_initializer(v, s.clone())
                    .map_err(|x| e(*at, x.to_string()))?;
            }
            Stmt::Node(ns) => {
                let mut o = Vec::new();
                for (name, ty) in ns.outs.iter().zip(&ns.types) {
                    o.push(match name {
                        None => None,
                        Some(n) => Some(
                            g.add_value(n.clone(), ty.clone())
                                .map_err(|x| e(ns.at, x.to_string()))?,
                        ),
                    });
                }
                outs.push(o);
            }
        }
    }
    let resolve = |g: &Graph, n: &str, at| -> R<ValueId> {
        g.value_by_name(n).ok_or_else(|| {
            let hint = if top {
                ""
            } else {
                " (list the outer values a subgraph reads in `captures (...)`)"
            };
            e(at, format!("undefined value %{n}{hint}"))
        })
    };
    let mut outs = outs.into_iter();
    for s in stmts {
        let Stmt::Node(ns) = s else { continue };
        let o = outs.next().expect("one entry per node statement");
        let mut ins = Vec::new();
        for i in &ns.ins {
            ins.push(match i {
                None => None,
                Some(n) => Some(resolve(g, n, ns.at)?),
            });
        }
        let mut implicit = Vec::new();
        for n in ns.node.captured_names() {
            implicit.push(resolve(g, &n, ns.at)?);
        }
        let id = g
            .add_node(ns.node, &ins, &o)
            .map_err(|x| e(ns.at, x.to_string()))?;
        if !implicit.is_empty() {
            g.set_implicit_inputs(id, implicit);
        }
    }
    for (n, ty, at) in outputs {
        let v = resolve(g, &n, at)?;
        if g.value(v).ty.is_none() {
            g.value_mut(v).ty = ty;
        }
        g.add_output(v);
    }
    Ok(())
}

/// The empty list of a named kind (`ints []`).
fn empty_list(kind: &str) -> Option<AttrValue> {
    const LISTS: [&str; 7] = [
        "floats",
        "ints",
        "strings",
        "tensors",
        "graphs",
        "sparse_tensors",
        "types",
    ];
    LISTS
        .contains(&kind)
        .then(|| AttrValue::placeholder(kind))
        .flatten()
}

fn is_float_text(s: &str) -> bool {
    s.contains(['.', 'e', 'E']) || s.contains("inf") || s.contains("nan")
}

fn parse_f32(s: &str) -> Option<f32> {
    if s == "nan" {
        Some(f32::NAN)
    } else {
        s.parse().ok()
    }
}

fn encode_element(dt: DType, s: &str, raw: &mut Vec<u8>) -> Result<(), String> {
    let bad = || format!("'{s}' is not a valid {dt} element");
    let f32v = || parse_f32(s).ok_or_else(bad);
    let int = || s.parse::<i128>().map_err(|_| bad());
    macro_rules! put_int {
        ($t:ty) => {{
            let v = <$t>::try_from(int()?).map_err(|_| bad())?;
            raw.extend_from_slice(&v.to_le_bytes());
        }};
    }
    match dt {
        DType::F32 => raw.extend_from_slice(&f32v()?.to_le_bytes()),
        DType::F64 => {
            let v = if s == "nan" {
                f64::NAN
            } else {
                s.parse::<f64>().map_err(|_| bad())?
            };
            raw.extend_from_slice(&v.to_le_bytes());
        }
        DType::F16 => raw.extend_from_slice(&half::f16::from_f32(f32v()?).to_le_bytes()),
        DType::BF16 => raw.extend_from_slice(&half::bf16::from_f32(f32v()?).to_le_bytes()),
        DType::Bool => raw.push(match s {
            "true" => 1,
            "false" => 0,
            _ => return Err(bad()),
        }),
        DType::I8 => put_int!(i8),
        DType::U8 => put_int!(u8),
        DType::I16 => put_int!(i16),
        DType::U16 => put_int!(u16),
        DType::I32 => put_int!(i32),
        DType::U32 => put_int!(u32),
        DType::I64 => put_int!(i64),
        DType::U64 => put_int!(u64),
        _ => {
            return Err(format!(
                "{dt} values cannot be written inline; use <N bytes>"
            ));
        }
    }
    Ok(())
}

/// Parses a model (the output of [`super::print_model`]).
pub fn parse_model(src: &str) -> Result<Model, ParseError> {
    let mut p = P {
        toks: lex(src)?,
        pos: 0,
    };
    p.keyword("ir_version")?;
    let ir_version = p.int()?;
    p.keyword("opset")?;
    let opset_imports = p.opsets()?;
    let graph = p.graph(true)?;
    let mut functions = Vec::new();
    while p.is_kw("func") {
        functions.push(p.function()?);
    }
    if p.peek() != &Tok::Eof {
        return p.fail(format!("unexpected {:?} after the model", p.peek()));
    }
    let mut m = Model::new(graph, 0);
    m.ir_version = ir_version;
    m.opset_imports = opset_imports;
    m.functions = functions;
    Ok(m)
}

/// Parses one graph (the output of [`super::print_graph`]).
pub fn parse_graph(src: &str) -> Result<Graph, ParseError> {
    let mut p = P {
        toks: lex(src)?,
        pos: 0,
    };
    let g = p.graph(true)?;
    if p.peek() != &Tok::Eof {
        return p.fail(format!("unexpected {:?} after the graph", p.peek()));
    }
    Ok(g)
}

/// Parses one attribute value in IR text syntax (`3`, `0.5`, `"nearest"`, `[1, 2]`, `ints []`, ...).
pub fn parse_attr_value(src: &str) -> Result<AttrValue, ParseError> {
    let mut p = P {
        toks: lex(src)?,
        pos: 0,
    };
    let v = p.attr_value()?;
    if p.peek() != &Tok::Eof {
        return p.fail(format!("unexpected {:?} after the value", p.peek()));
    }
    Ok(v)
}
