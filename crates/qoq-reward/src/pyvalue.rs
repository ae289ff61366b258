//! Python values as the reference reward sees them, and the two parsers it uses on model output:
//! `json.loads` (CPython's C scanner, strict mode, `NaN`/`Infinity` accepted) and
//! `ast.literal_eval` (Python 3.11 literal grammar). Spec §8.4, §8.6.
//!
//! Both parsers are total: any input gives `Ok` or `Err`, never a panic, and nesting depth is
//! bounded (CPython raises `RecursionError` for deep JSON and "too many nested parentheses"
//! beyond 200 brackets for literals).

/// A Python integer: exact when it fits `i128`, otherwise its value rounded to `f64`
/// (infinite when Python's `float(n)` would raise `OverflowError`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PyInt {
    /// Exactly representable.
    Small(i128),
    /// Beyond `i128`: the correctly rounded `f64` (may be infinite).
    Big(f64),
}

impl PyInt {
    /// Python's `float(n)`; `None` where Python raises `OverflowError`.
    pub fn to_f64(self) -> Option<f64> {
        let v = match self {
            PyInt::Small(i) => i as f64,
            PyInt::Big(f) => f,
        };
        v.is_finite().then_some(v)
    }
}

/// A value produced by `json.loads` or `ast.literal_eval`.
#[derive(Debug, Clone, PartialEq)]
pub enum PyValue {
    /// `None` / `null`.
    None,
    /// `True` / `False`.
    Bool(bool),
    /// `int`.
    Int(PyInt),
    /// `float`.
    Float(f64),
    /// `complex`.
    Complex(f64, f64),
    /// `str` (lone surrogates are replaced by U+FFFD).
    Str(String),
    /// `bytes`.
    Bytes(Vec<u8>),
    /// `Ellipsis`.
    Ellipsis,
    /// `list`.
    List(Vec<PyValue>),
    /// `tuple`.
    Tuple(Vec<PyValue>),
    /// `dict`: distinct keys in first-insertion order, each with its last value.
    Dict(Vec<(PyValue, PyValue)>),
    /// `set`: distinct elements.
    Set(Vec<PyValue>),
}

impl PyValue {
    /// Python truthiness (`if json_data:`).
    pub fn truthy(&self) -> bool {
        match self {
            PyValue::None => false,
            PyValue::Bool(b) => *b,
            PyValue::Int(PyInt::Small(i)) => *i != 0,
            PyValue::Int(PyInt::Big(_)) => true,
            PyValue::Float(f) => *f != 0.0,
            PyValue::Complex(a, b) => *a != 0.0 || *b != 0.0,
            PyValue::Str(s) => !s.is_empty(),
            PyValue::Bytes(b) => !b.is_empty(),
            PyValue::Ellipsis => true,
            PyValue::List(v) | PyValue::Tuple(v) | PyValue::Set(v) => !v.is_empty(),
            PyValue::Dict(v) => !v.is_empty(),
        }
    }

    /// `len(x)`; `None` where Python raises `TypeError`.
    pub fn py_len(&self) -> Option<usize> {
        match self {
            PyValue::Str(s) => Some(s.chars().count()),
            PyValue::Bytes(b) => Some(b.len()),
            PyValue::List(v) | PyValue::Tuple(v) | PyValue::Set(v) => Some(v.len()),
            PyValue::Dict(v) => Some(v.len()),
            _ => None,
        }
    }

    /// Whether the value can be a dict key / set element.
    fn hashable(&self) -> bool {
        match self {
            PyValue::List(_) | PyValue::Dict(_) | PyValue::Set(_) => false,
            PyValue::Tuple(v) => v.iter().all(PyValue::hashable),
            _ => true,
        }
    }

    /// Numeric value for cross-type equality (`1 == 1.0 == True`), `None` if not a number.
    fn numeric(&self) -> Option<(f64, f64, Option<i128>)> {
        match self {
            PyValue::Bool(b) => Some((*b as i32 as f64, 0.0, Some(*b as i128))),
            PyValue::Int(PyInt::Small(i)) => Some((*i as f64, 0.0, Some(*i))),
            PyValue::Int(PyInt::Big(f)) => Some((*f, 0.0, None)),
            PyValue::Float(f) => Some((*f, 0.0, None)),
            PyValue::Complex(a, b) => Some((*a, *b, None)),
            _ => None,
        }
    }

    /// Python `==` between hashable values (dict-key semantics).
    pub fn key_eq(&self, other: &PyValue) -> bool {
        if let (Some(a), Some(b)) = (self.numeric(), other.numeric()) {
            if let (Some(x), Some(y)) = (a.2, b.2) {
                return x == y;
            }
            if let (Some(x), None) | (None, Some(x)) = (a.2, b.2) {
                // exact int vs float/complex: equal only if the float is integral and equal
                let (f, im) = if a.2.is_some() {
                    (b.0, b.1)
                } else {
                    (a.0, a.1)
                };
                return im == 0.0 && f.fract() == 0.0 && f.abs() < 1.7e38 && f as i128 == x;
            }
            return a.0 == b.0 && a.1 == b.1;
        }
        match (self, other) {
            (PyValue::None, PyValue::None) | (PyValue::Ellipsis, PyValue::Ellipsis) => true,
            (PyValue::Str(a), PyValue::Str(b)) => a == b,
            (PyValue::Bytes(a), PyValue::Bytes(b)) => a == b,
            (PyValue::Tuple(a), PyValue::Tuple(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.key_eq(y))
            }
            _ => false,
        }
    }

    /// `d[key]` for a dict (last value of an equal key); `None` when absent or not a dict.
    pub fn dict_get(&self, key: &PyValue) -> Option<&PyValue> {
        match self {
            PyValue::Dict(items) => items.iter().find(|(k, _)| k.key_eq(key)).map(|(_, v)| v),
            _ => None,
        }
    }

    /// `d[name]` for a dict and a string key, without allocating the key.
    pub fn dict_get_str(&self, name: &str) -> Option<&PyValue> {
        match self {
            PyValue::Dict(items) => items
                .iter()
                .find(|(k, _)| matches!(k, PyValue::Str(s) if s == name))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// `"name" in d` for a dict.
    pub fn dict_has(&self, name: &str) -> bool {
        self.dict_get_str(name).is_some()
    }

    /// `x[i]` for a small non-negative index: list/tuple element, str character, bytes value,
    /// dict value of an equal key. `None` where Python raises.
    pub fn index(&self, i: usize) -> Option<PyValue> {
        match self {
            PyValue::List(v) | PyValue::Tuple(v) => v.get(i).cloned(),
            PyValue::Str(s) => s.chars().nth(i).map(|c| PyValue::Str(c.to_string())),
            PyValue::Bytes(b) => b.get(i).map(|&x| PyValue::Int(PyInt::Small(x as i128))),
            PyValue::Dict(_) => self
                .dict_get(&PyValue::Int(PyInt::Small(i as i128)))
                .cloned(),
            _ => None,
        }
    }
}

/// Build a dict with Python's duplicate-key rule; `None` when a key is unhashable.
fn make_dict(pairs: Vec<(PyValue, PyValue)>) -> Option<PyValue> {
    let mut out: Vec<(PyValue, PyValue)> = Vec::with_capacity(pairs.len());
    for (k, v) in pairs {
        if !k.hashable() {
            return None;
        }
        if let Some(slot) = out.iter_mut().find(|(ek, _)| ek.key_eq(&k)) {
            slot.1 = v;
        } else {
            out.push((k, v));
        }
    }
    Some(PyValue::Dict(out))
}

/// Build a set; `None` when an element is unhashable.
fn make_set(items: Vec<PyValue>) -> Option<PyValue> {
    let mut out: Vec<PyValue> = Vec::with_capacity(items.len());
    for x in items {
        if !x.hashable() {
            return None;
        }
        if !out.iter().any(|e| e.key_eq(&x)) {
            out.push(x);
        }
    }
    Some(PyValue::Set(out))
}

/// Why `json.loads` failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonError {
    /// `json.JSONDecodeError`: the reference then tries `ast.literal_eval`.
    Decode,
    /// Another exception, not a `JSONDecodeError`: `RecursionError` (nesting deeper than
    /// [`JSON_MAX_DEPTH`]) or `ValueError` (an integer of more than [`MAX_INT_DIGITS`] digits).
    Other,
}

/// Nesting depth at which CPython's JSON scanner raises `RecursionError` (the default recursion
/// limit of 1000 less the frames of a typical caller).
pub const JSON_MAX_DEPTH: usize = 975;

/// `json.loads(s)` with CPython's defaults.
pub fn json_loads(s: &str) -> Result<PyValue, JsonError> {
    if s.starts_with('\u{feff}') {
        return Err(JsonError::Decode);
    }
    let mut p = JsonParser {
        b: s.as_bytes(),
        s,
        i: 0,
    };
    p.ws();
    let v = p.value(0)?;
    p.ws();
    if p.i != p.b.len() {
        return Err(JsonError::Decode);
    }
    Ok(v)
}

struct JsonParser<'a> {
    s: &'a str,
    b: &'a [u8],
    i: usize,
}

impl JsonParser<'_> {
    fn ws(&mut self) {
        while self.i < self.b.len() && matches!(self.b[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn eat(&mut self, lit: &str) -> bool {
        if self.b[self.i..].starts_with(lit.as_bytes()) {
            self.i += lit.len();
            true
        } else {
            false
        }
    }

    fn value(&mut self, depth: usize) -> Result<PyValue, JsonError> {
        let Some(&c) = self.b.get(self.i) else {
            return Err(JsonError::Decode);
        };
        match c {
            b'"' => {
                self.i += 1;
                self.string().map(PyValue::Str)
            }
            b'{' => {
                if depth + 1 > JSON_MAX_DEPTH {
                    return Err(JsonError::Other);
                }
                self.i += 1;
                self.object(depth + 1)
            }
            b'[' => {
                if depth + 1 > JSON_MAX_DEPTH {
                    return Err(JsonError::Other);
                }
                self.i += 1;
                self.array(depth + 1)
            }
            b'n' if self.eat("null") => Ok(PyValue::None),
            b't' if self.eat("true") => Ok(PyValue::Bool(true)),
            b'f' if self.eat("false") => Ok(PyValue::Bool(false)),
            b'N' if self.eat("NaN") => Ok(PyValue::Float(f64::NAN)),
            b'I' if self.eat("Infinity") => Ok(PyValue::Float(f64::INFINITY)),
            b'-' if self.eat("-Infinity") => Ok(PyValue::Float(f64::NEG_INFINITY)),
            b'-' | b'0'..=b'9' => self.number(),
            _ => Err(JsonError::Decode),
        }
    }

    fn digits(&mut self) -> usize {
        let st = self.i;
        while self.i < self.b.len() && self.b[self.i].is_ascii_digit() {
            self.i += 1;
        }
        self.i - st
    }

    fn number(&mut self) -> Result<PyValue, JsonError> {
        let start = self.i;
        if self.b[self.i] == b'-' {
            self.i += 1;
        }
        match self.b.get(self.i) {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(JsonError::Decode),
        }
        let mut is_float = false;
        if self.b.get(self.i) == Some(&b'.')
            && self.b.get(self.i + 1).is_some_and(u8::is_ascii_digit)
        {
            self.i += 1;
            self.digits();
            is_float = true;
        }
        if matches!(self.b.get(self.i), Some(b'e' | b'E')) {
            let save = self.i;
            self.i += 1;
            if matches!(self.b.get(self.i), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if self.digits() == 0 {
                self.i = save;
            } else {
                is_float = true;
            }
        }
        let text = &self.s[start..self.i];
        if !is_float && text.trim_start_matches('-').len() > MAX_INT_DIGITS {
            return Err(JsonError::Other);
        }
        Ok(if is_float {
            PyValue::Float(text.parse::<f64>().unwrap_or(f64::NAN))
        } else {
            PyValue::Int(parse_int_decimal(text))
        })
    }

    fn hex4(&mut self) -> Result<u32, JsonError> {
        let h = self.b.get(self.i..self.i + 4).ok_or(JsonError::Decode)?;
        let mut v = 0u32;
        for &c in h {
            v = v * 16 + (c as char).to_digit(16).ok_or(JsonError::Decode)?;
        }
        self.i += 4;
        Ok(v)
    }

    fn string(&mut self) -> Result<String, JsonError> {
        let mut out = String::new();
        loop {
            let st = self.i;
            while self.i < self.b.len() && !matches!(self.b[self.i], b'"' | b'\\' | 0..=0x1f) {
                self.i += 1;
            }
            out.push_str(&self.s[st..self.i]);
            match self.b.get(self.i) {
                Some(b'"') => {
                    self.i += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.i += 1;
                    let c = *self.b.get(self.i).ok_or(JsonError::Decode)?;
                    self.i += 1;
                    match c {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let u = self.hex4()?;
                            let mut cp = u;
                            if (0xd800..0xdc00).contains(&u)
                                && self.b.get(self.i..self.i + 2) == Some(b"\\u")
                            {
                                let save = self.i;
                                self.i += 2;
                                let lo = self.hex4()?;
                                if (0xdc00..0xe000).contains(&lo) {
                                    cp = 0x10000 + ((u - 0xd800) << 10) + (lo - 0xdc00);
                                } else {
                                    self.i = save;
                                }
                            }
                            out.push(char::from_u32(cp).unwrap_or('\u{fffd}'));
                        }
                        _ => return Err(JsonError::Decode),
                    }
                }
                _ => return Err(JsonError::Decode),
            }
        }
    }

    fn object(&mut self, depth: usize) -> Result<PyValue, JsonError> {
        let mut pairs = Vec::new();
        self.ws();
        if self.b.get(self.i) == Some(&b'}') {
            self.i += 1;
            return Ok(PyValue::Dict(pairs));
        }
        loop {
            if self.b.get(self.i) != Some(&b'"') {
                return Err(JsonError::Decode);
            }
            self.i += 1;
            let k = self.string()?;
            self.ws();
            if self.b.get(self.i) != Some(&b':') {
                return Err(JsonError::Decode);
            }
            self.i += 1;
            self.ws();
            let v = self.value(depth)?;
            pairs.push((PyValue::Str(k), v));
            self.ws();
            match self.b.get(self.i) {
                Some(b'}') => {
                    self.i += 1;
                    return make_dict(pairs).ok_or(JsonError::Decode);
                }
                Some(b',') => {
                    self.i += 1;
                    self.ws();
                }
                _ => return Err(JsonError::Decode),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<PyValue, JsonError> {
        let mut items = Vec::new();
        self.ws();
        if self.b.get(self.i) == Some(&b']') {
            self.i += 1;
            return Ok(PyValue::List(items));
        }
        loop {
            items.push(self.value(depth)?);
            self.ws();
            match self.b.get(self.i) {
                Some(b']') => {
                    self.i += 1;
                    return Ok(PyValue::List(items));
                }
                Some(b',') => {
                    self.i += 1;
                    self.ws();
                }
                _ => return Err(JsonError::Decode),
            }
        }
    }
}

/// Python 3.11's `sys.get_int_max_str_digits()`: longer decimal integers raise `ValueError`.
pub const MAX_INT_DIGITS: usize = 4300;

/// Parse an optionally signed run of ASCII decimal digits (no underscores) as a Python int.
fn parse_int_decimal(text: &str) -> PyInt {
    match text.parse::<i128>() {
        Ok(v) => PyInt::Small(v),
        Err(_) => PyInt::Big(text.parse::<f64>().unwrap_or(f64::NAN)),
    }
}

/// Python's `int(s)` for a `str` (base 10): surrounding whitespace, an optional sign, ASCII
/// digits with single underscores between them. `None` where Python raises `ValueError`.
/// Non-ASCII decimal digits (which Python also accepts) are not recognised.
pub fn py_int_from_str(s: &str) -> Option<PyInt> {
    let t = crate::text::py_strip(s);
    let (neg, body) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let bytes = body.as_bytes();
    if bytes.is_empty() || !bytes[0].is_ascii_digit() || !bytes[bytes.len() - 1].is_ascii_digit() {
        return None;
    }
    let mut digits = String::with_capacity(bytes.len() + 1);
    if neg {
        digits.push('-');
    }
    if bytes.iter().filter(|c| c.is_ascii_digit()).count() > MAX_INT_DIGITS {
        return None;
    }
    let mut prev_us = false;
    for &c in bytes {
        if c == b'_' {
            if prev_us {
                return None;
            }
            prev_us = true;
        } else if c.is_ascii_digit() {
            prev_us = false;
            digits.push(c as char);
        } else {
            return None;
        }
    }
    Some(parse_int_decimal(&digits))
}

/// Why `ast.literal_eval` failed (every failure is swallowed by the reference).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiteralError;

/// Bracket nesting at which CPython's tokenizer reports "too many nested parentheses".
pub const LITERAL_MAX_NESTING: usize = 200;

/// `ast.literal_eval(s)` (Python 3.11): the literal subset of an `eval`-mode expression.
pub fn literal_eval(s: &str) -> Result<PyValue, LiteralError> {
    let s = s.trim_start_matches([' ', '\t']);
    if s.contains('\0') {
        return Err(LiteralError);
    }
    let toks = tokenize(s)?;
    let mut p = LitParser { t: &toks, i: 0 };
    let e = p.expr_list()?;
    while p.peek() == &Tok::Newline {
        p.i += 1;
    }
    if p.peek() != &Tok::End {
        return Err(LiteralError);
    }
    convert(e)
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(Num),
    Str(Vec<StrPiece>),
    Name(String),
    Op(&'static str),
    Newline,
    End,
}

#[derive(Debug, Clone, PartialEq)]
enum Num {
    Int(PyInt),
    Float(f64),
    Imag(f64),
}

#[derive(Debug, Clone, PartialEq)]
enum StrPiece {
    Str(String),
    Bytes(Vec<u8>),
    FString,
}

fn tokenize(s: &str) -> Result<Vec<Tok>, LiteralError> {
    let b = s.as_bytes();
    let mut i = 0;
    let mut toks = Vec::new();
    let mut level = 0usize;
    let mut at_line_start = true;
    while i < b.len() || at_line_start {
        // indentation / blank lines: a line that is not blank (a comment or nothing before its
        // newline) must start in column 0 outside brackets ("unexpected indent"); a form feed
        // resets the column; the last line without a newline is not blank
        if at_line_start {
            let mut col = 0usize;
            while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\x0c') {
                col = if b[i] == b'\x0c' { 0 } else { col + 1 };
                i += 1;
            }
            let blank = i < b.len() && matches!(b[i], b'\n' | b'\r' | b'#');
            if !blank && col > 0 {
                return Err(LiteralError);
            }
            at_line_start = false;
            continue;
        }
        let c = b[i];
        match c {
            b' ' | b'\t' | b'\x0c' => i += 1,
            b'#' => {
                while i < b.len() && !matches!(b[i], b'\n' | b'\r') {
                    i += 1;
                }
            }
            b'\\' => {
                // explicit line joining: backslash immediately followed by a newline
                i += 1;
                match b.get(i) {
                    Some(b'\n') => i += 1,
                    Some(b'\r') => {
                        i += 1;
                        if b.get(i) == Some(&b'\n') {
                            i += 1;
                        }
                    }
                    _ => return Err(LiteralError),
                }
                if i >= b.len() {
                    return Err(LiteralError);
                }
            }
            b'\n' | b'\r' => {
                i += 1;
                if c == b'\r' && b.get(i) == Some(&b'\n') {
                    i += 1;
                }
                if level == 0 {
                    if !toks.is_empty() && toks.last() != Some(&Tok::Newline) {
                        toks.push(Tok::Newline);
                    }
                    at_line_start = true;
                }
            }
            b'(' | b'[' | b'{' => {
                if level >= LITERAL_MAX_NESTING {
                    return Err(LiteralError);
                }
                level += 1;
                toks.push(Tok::Op(match c {
                    b'(' => "(",
                    b'[' => "[",
                    _ => "{",
                }));
                i += 1;
            }
            b')' | b']' | b'}' => {
                if level == 0 {
                    return Err(LiteralError);
                }
                level -= 1;
                toks.push(Tok::Op(match c {
                    b')' => ")",
                    b']' => "]",
                    _ => "}",
                }));
                i += 1;
            }
            b',' | b':' | b'+' | b'-' => {
                toks.push(Tok::Op(match c {
                    b',' => ",",
                    b':' => ":",
                    b'+' => "+",
                    _ => "-",
                }));
                i += 1;
            }
            b'.' if b.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                let (n, ni) = number(s, i)?;
                toks.push(Tok::Num(n));
                i = ni;
            }
            b'.' if b[i..].starts_with(b"...") => {
                toks.push(Tok::Name("...".into()));
                i += 3;
            }
            b'0'..=b'9' => {
                let (n, ni) = number(s, i)?;
                toks.push(Tok::Num(n));
                i = ni;
            }
            b'"' => {
                let (p, ni) = string(s, i, "")?;
                push_str(&mut toks, p);
                i = ni;
            }
            _ if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                let st = i;
                let rest = &s[i..];
                let mut end = i;
                for (k, ch) in rest.char_indices() {
                    if ch == '_' || ch.is_alphanumeric() {
                        end = i + k + ch.len_utf8();
                    } else {
                        break;
                    }
                }
                if end == st {
                    return Err(LiteralError); // a non-identifier, non-ASCII character
                }
                let name = &s[st..end];
                if b.get(end) == Some(&b'"') && is_str_prefix(name) {
                    let (p, ni) = string(s, end, name)?;
                    push_str(&mut toks, p);
                    i = ni;
                } else {
                    toks.push(Tok::Name(name.to_string()));
                    i = end;
                }
            }
            _ => {
                // other operators / characters: no literal can contain them
                return Err(LiteralError);
            }
        }
    }
    if level != 0 {
        return Err(LiteralError);
    }
    toks.push(Tok::End);
    Ok(toks)
}

fn push_str(toks: &mut Vec<Tok>, p: StrPiece) {
    if let Some(Tok::Str(v)) = toks.last_mut() {
        v.push(p);
    } else {
        toks.push(Tok::Str(vec![p]));
    }
}

fn is_str_prefix(p: &str) -> bool {
    matches!(
        p.to_ascii_lowercase().as_str(),
        "r" | "u" | "b" | "br" | "rb" | "f" | "fr" | "rf"
    ) && p.is_ascii()
}

fn number(s: &str, start: usize) -> Result<(Num, usize), LiteralError> {
    let b = s.as_bytes();
    let mut i = start;
    let at = |i: usize| b.get(i).copied().unwrap_or(0);
    // radix ints
    if at(i) == b'0' && matches!(at(i + 1), b'x' | b'X' | b'o' | b'O' | b'b' | b'B') {
        let radix = match at(i + 1) {
            b'x' | b'X' => 16,
            b'o' | b'O' => 8,
            _ => 2,
        };
        i += 2;
        let mut digits = String::new();
        loop {
            if at(i) == b'_' {
                i += 1;
            }
            let d = at(i) as char;
            if d.is_digit(radix) {
                digits.push(d);
                i += 1;
            } else {
                break;
            }
        }
        if digits.is_empty() || at(i - 1) == b'_' || at(i).is_ascii_alphanumeric() {
            return Err(LiteralError);
        }
        let v = i128::from_str_radix(&digits, radix)
            .map(PyInt::Small)
            .unwrap_or_else(|_| {
                PyInt::Big(digits.chars().fold(0.0f64, |a, c| {
                    a * radix as f64 + c.to_digit(radix).unwrap_or(0) as f64
                }))
            });
        return Ok((Num::Int(v), i));
    }
    // decimal digits with single underscores between digits
    let dec = |i: &mut usize| -> Result<String, LiteralError> {
        let mut out = String::new();
        while at(*i).is_ascii_digit() {
            out.push(at(*i) as char);
            *i += 1;
            if at(*i) == b'_' {
                if !at(*i + 1).is_ascii_digit() {
                    return Err(LiteralError);
                }
                *i += 1;
            }
        }
        Ok(out)
    };
    let int_part = dec(&mut i)?;
    let mut frac = None;
    let mut exp = None;
    if at(i) == b'.' {
        i += 1;
        frac = Some(dec(&mut i)?);
    }
    if matches!(at(i), b'e' | b'E') {
        let save = i;
        i += 1;
        let mut sign = String::new();
        if matches!(at(i), b'+' | b'-') {
            sign.push(at(i) as char);
            i += 1;
        }
        let d = dec(&mut i)?;
        if d.is_empty() {
            // `1e` / `1ex`: a number directly followed by a name is a syntax error
            let _ = save;
            return Err(LiteralError);
        }
        exp = Some(format!("{sign}{d}"));
    }
    let imag = matches!(at(i), b'j' | b'J');
    if imag {
        i += 1;
    }
    // a number immediately followed by an identifier character is invalid
    if at(i).is_ascii_alphanumeric() || at(i) == b'_' || at(i) == b'.' && frac.is_none() {
        return Err(LiteralError);
    }
    let is_float = frac.is_some() || exp.is_some();
    let end = if imag { i - 1 } else { i };
    let raw = &s[start..end];
    let text: std::borrow::Cow<'_, str> = if raw.contains('_') {
        format!(
            "{}{}{}",
            if int_part.is_empty() { "0" } else { &int_part },
            frac.map(|f| format!(".{f}")).unwrap_or_default(),
            exp.map(|e| format!("e{e}")).unwrap_or_default()
        )
        .into()
    } else {
        raw.into()
    };
    if imag {
        return Ok((Num::Imag(text.parse().unwrap_or(f64::NAN)), i));
    }
    if is_float {
        return Ok((Num::Float(text.parse().unwrap_or(f64::NAN)), i));
    }
    if int_part.len() > MAX_INT_DIGITS {
        return Err(LiteralError);
    }
    if int_part.len() > 1 && int_part.bytes().any(|c| c != b'0') && int_part.starts_with('0') {
        return Err(LiteralError); // leading zeros in a decimal integer literal
    }
    Ok((Num::Int(parse_int_decimal(&text)), i))
}

/// A string literal starting at the opening quote `"` (single quotes never occur: the reference
/// replaced them). Returns the piece and the index after the closing quote.
fn string(s: &str, q: usize, prefix: &str) -> Result<(StrPiece, usize), LiteralError> {
    let p = prefix.to_ascii_lowercase();
    let raw = p.contains('r');
    let bytes = p.contains('b');
    let fstr = p.contains('f');
    let b = s.as_bytes();
    let triple = b[q..].starts_with(b"\"\"\"");
    let mut i = q + if triple { 3 } else { 1 };
    let body_start = i;
    let body_end;
    loop {
        let Some(&c) = b.get(i) else {
            return Err(LiteralError);
        };
        if c == b'\\' {
            i += 2;
            // a backslash-CRLF consumes both bytes
            if b.get(i - 1) == Some(&b'\r') && b.get(i) == Some(&b'\n') {
                i += 1;
            }
            continue;
        }
        if !triple && matches!(c, b'\n' | b'\r') {
            return Err(LiteralError);
        }
        if c == b'"' {
            if !triple {
                body_end = i;
                i += 1;
                break;
            }
            if b[i..].starts_with(b"\"\"\"") {
                body_end = i;
                i += 3;
                break;
            }
        }
        i += 1;
    }
    let body = s
        .get(body_start..body_end.min(s.len()))
        .ok_or(LiteralError)?;
    if fstr {
        return Ok((StrPiece::FString, i));
    }
    if bytes && !body.is_ascii() {
        return Err(LiteralError);
    }
    let text = if raw {
        body.replace("\r\n", "\n").replace('\r', "\n")
    } else {
        unescape(body, bytes)?
    };
    Ok((
        if bytes {
            StrPiece::Bytes(text.chars().map(|c| c as u32 as u8).collect())
        } else {
            StrPiece::Str(text)
        },
        i,
    ))
}

fn unescape(body: &str, bytes: bool) -> Result<String, LiteralError> {
    let mut out = String::with_capacity(body.len());
    let mut it = body.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\r' {
            if it.peek() == Some(&'\n') {
                it.next();
            }
            out.push('\n');
            continue;
        }
        if c != '\\' {
            out.push(c);
            continue;
        }
        let Some(e) = it.next() else {
            return Err(LiteralError);
        };
        match e {
            '\n' => {}
            '\r' => {
                if it.peek() == Some(&'\n') {
                    it.next();
                }
            }
            '\\' => out.push('\\'),
            '"' => out.push('"'),
            '\'' => out.push('\''),
            'a' => out.push('\u{7}'),
            'b' => out.push('\u{8}'),
            'f' => out.push('\u{c}'),
            'n' => out.push('\n'),
            'r' => out.push('\r'),
            't' => out.push('\t'),
            'v' => out.push('\u{b}'),
            '0'..='7' => {
                let mut v = e.to_digit(8).unwrap_or(0);
                for _ in 0..2 {
                    match it.peek().and_then(|d| d.to_digit(8)) {
                        Some(d) => {
                            v = v * 8 + d;
                            it.next();
                        }
                        None => break,
                    }
                }
                if bytes {
                    out.push(char::from_u32(v & 0xff).unwrap_or('\u{fffd}'));
                } else {
                    out.push(char::from_u32(v).unwrap_or('\u{fffd}'));
                }
            }
            'x' | 'u' | 'U' if !(bytes && e != 'x') => {
                let n = match e {
                    'x' => 2,
                    'u' => 4,
                    _ => 8,
                };
                let mut v = 0u32;
                for _ in 0..n {
                    let d = it.next().and_then(|d| d.to_digit(16)).ok_or(LiteralError)?;
                    v = v.wrapping_mul(16).wrapping_add(d);
                }
                if v > 0x10ffff {
                    return Err(LiteralError);
                }
                out.push(char::from_u32(v).unwrap_or('\u{fffd}'));
            }
            'N' if !bytes => {
                // \N{NAME}: the name is looked up in the Unicode database; we accept any
                // well-formed name and substitute U+FFFD (only the literal's success matters).
                if it.next() != Some('{') {
                    return Err(LiteralError);
                }
                let mut name = String::new();
                loop {
                    match it.next() {
                        Some('}') => break,
                        Some(ch) => name.push(ch),
                        None => return Err(LiteralError),
                    }
                }
                if name.is_empty() {
                    return Err(LiteralError);
                }
                out.push('\u{fffd}');
            }
            other => {
                out.push('\\');
                out.push(other);
            }
        }
    }
    Ok(out)
}

/// A parsed expression of the literal subset (before `literal_eval`'s conversion rules).
#[derive(Debug, Clone)]
enum Expr {
    Const(PyValue),
    /// An imaginary literal.
    Imag(f64),
    Name(String),
    Tuple(Vec<Expr>),
    List(Vec<Expr>),
    Set(Vec<Expr>),
    Dict(Vec<(Expr, Expr)>),
    /// `set()`.
    EmptySetCall,
    /// Unary `+`/`-` applied to an expression.
    Unary(bool, Box<Expr>),
    /// Binary `+`/`-`.
    Bin(Box<Expr>, bool, Box<Expr>),
    /// Anything else that parses but that `literal_eval` rejects.
    Other,
}

struct LitParser<'a> {
    t: &'a [Tok],
    i: usize,
}

impl LitParser<'_> {
    fn peek(&self) -> &Tok {
        self.t.get(self.i).unwrap_or(&Tok::End)
    }

    fn is_op(&self, op: &str) -> bool {
        matches!(self.peek(), Tok::Op(o) if *o == op)
    }

    fn expect(&mut self, op: &str) -> Result<(), LiteralError> {
        if self.is_op(op) {
            self.i += 1;
            Ok(())
        } else {
            Err(LiteralError)
        }
    }

    /// `a, b, c` (a tuple when any comma occurs), or one expression.
    fn expr_list(&mut self) -> Result<Expr, LiteralError> {
        let first = self.expr()?;
        if !self.is_op(",") {
            return Ok(first);
        }
        let mut items = vec![first];
        while self.is_op(",") {
            self.i += 1;
            if self.starts_expr() {
                items.push(self.expr()?);
            } else {
                break;
            }
        }
        Ok(Expr::Tuple(items))
    }

    fn starts_expr(&self) -> bool {
        match self.peek() {
            Tok::Num(_) | Tok::Str(_) | Tok::Name(_) => true,
            Tok::Op(o) => matches!(*o, "(" | "[" | "{" | "+" | "-"),
            _ => false,
        }
    }

    /// Additive expression: `unary ((+|-) unary)*`.
    fn expr(&mut self) -> Result<Expr, LiteralError> {
        let mut left = self.unary()?;
        loop {
            let plus = if self.is_op("+") {
                true
            } else if self.is_op("-") {
                false
            } else {
                break;
            };
            if matches!(left, Expr::Bin(..)) {
                // `a + b + c` is never a literal (the left of a complex sum must be a signed
                // number); failing here also keeps the expression tree shallow
                return Err(LiteralError);
            }
            self.i += 1;
            let right = self.unary()?;
            left = Expr::Bin(Box::new(left), plus, Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Expr, LiteralError> {
        if self.is_op("+") || self.is_op("-") {
            let plus = self.is_op("+");
            self.i += 1;
            if self.is_op("+") || self.is_op("-") {
                // a signed signed number (`--1`) is never a literal; no deep recursion either
                return Err(LiteralError);
            }
            let e = self.atom()?;
            return Ok(Expr::Unary(plus, Box::new(e)));
        }
        self.atom()
    }

    fn atom(&mut self) -> Result<Expr, LiteralError> {
        let tok = self.peek().clone();
        self.i += 1;
        let e = match tok {
            Tok::Num(Num::Int(v)) => Expr::Const(PyValue::Int(v)),
            Tok::Num(Num::Float(v)) => Expr::Const(PyValue::Float(v)),
            Tok::Num(Num::Imag(v)) => Expr::Imag(v),
            Tok::Str(pieces) => {
                let has_b = pieces.iter().any(|p| matches!(p, StrPiece::Bytes(_)));
                let has_s = pieces
                    .iter()
                    .any(|p| matches!(p, StrPiece::Str(_) | StrPiece::FString));
                if has_b && has_s {
                    return Err(LiteralError);
                }
                if pieces.iter().any(|p| matches!(p, StrPiece::FString)) {
                    Expr::Other
                } else if has_b {
                    let mut v = Vec::new();
                    for p in pieces {
                        if let StrPiece::Bytes(b) = p {
                            v.extend(b);
                        }
                    }
                    Expr::Const(PyValue::Bytes(v))
                } else {
                    let mut v = String::new();
                    for p in pieces {
                        if let StrPiece::Str(s) = p {
                            v.push_str(&s);
                        }
                    }
                    Expr::Const(PyValue::Str(v))
                }
            }
            Tok::Name(n) => {
                if n == "set" && self.is_op("(") {
                    self.i += 1;
                    if self.is_op(")") {
                        self.i += 1;
                        return Ok(Expr::EmptySetCall);
                    }
                    // set(args) parses as a call, which literal_eval rejects
                    self.call_args()?;
                    return Ok(Expr::Other);
                }
                if matches!(
                    n.as_str(),
                    "and"
                        | "or"
                        | "not"
                        | "if"
                        | "else"
                        | "lambda"
                        | "for"
                        | "in"
                        | "is"
                        | "await"
                        | "yield"
                        | "import"
                        | "from"
                        | "class"
                        | "def"
                        | "return"
                        | "del"
                        | "pass"
                        | "while"
                        | "with"
                        | "as"
                        | "try"
                        | "except"
                        | "finally"
                        | "raise"
                        | "global"
                        | "nonlocal"
                        | "assert"
                        | "break"
                        | "continue"
                        | "elif"
                ) {
                    return Err(LiteralError);
                }
                Expr::Name(n)
            }
            Tok::Op("(") => {
                if self.is_op(")") {
                    self.i += 1;
                    Expr::Tuple(vec![])
                } else {
                    let e = self.expr_list()?;
                    self.expect(")")?;
                    e
                }
            }
            Tok::Op("[") => {
                let items = self.seq("]")?;
                Expr::List(items)
            }
            Tok::Op("{") => self.brace()?,
            _ => return Err(LiteralError),
        };
        // trailers (calls, subscripts) are not literals; a parse error either way is fine
        if self.is_op("(") || self.is_op("[") {
            return Err(LiteralError);
        }
        Ok(e)
    }

    fn call_args(&mut self) -> Result<(), LiteralError> {
        loop {
            self.expr()?;
            if self.is_op(",") {
                self.i += 1;
                if self.is_op(")") {
                    self.i += 1;
                    return Ok(());
                }
            } else {
                return self.expect(")");
            }
        }
    }

    fn seq(&mut self, close: &str) -> Result<Vec<Expr>, LiteralError> {
        let mut items = Vec::new();
        loop {
            if self.is_op(close) {
                self.i += 1;
                return Ok(items);
            }
            items.push(self.expr()?);
            if self.is_op(",") {
                self.i += 1;
            } else {
                self.expect(close)?;
                return Ok(items);
            }
        }
    }

    fn brace(&mut self) -> Result<Expr, LiteralError> {
        if self.is_op("}") {
            self.i += 1;
            return Ok(Expr::Dict(vec![]));
        }
        let first = self.expr()?;
        if self.is_op(":") {
            self.i += 1;
            let v = self.expr()?;
            let mut pairs = vec![(first, v)];
            loop {
                if self.is_op("}") {
                    self.i += 1;
                    return Ok(Expr::Dict(pairs));
                }
                self.expect(",")?;
                if self.is_op("}") {
                    self.i += 1;
                    return Ok(Expr::Dict(pairs));
                }
                let k = self.expr()?;
                self.expect(":")?;
                let v = self.expr()?;
                pairs.push((k, v));
            }
        }
        let mut items = vec![first];
        loop {
            if self.is_op("}") {
                self.i += 1;
                return Ok(Expr::Set(items));
            }
            self.expect(",")?;
            if self.is_op("}") {
                self.i += 1;
                return Ok(Expr::Set(items));
            }
            items.push(self.expr()?);
        }
    }
}

/// `literal_eval`'s `_convert`.
fn convert(e: Expr) -> Result<PyValue, LiteralError> {
    match e {
        Expr::Const(v) => Ok(v),
        Expr::Imag(v) => Ok(PyValue::Complex(0.0, v)),
        Expr::Name(n) => match n.as_str() {
            "True" => Ok(PyValue::Bool(true)),
            "False" => Ok(PyValue::Bool(false)),
            "None" => Ok(PyValue::None),
            "..." => Ok(PyValue::Ellipsis),
            _ => Err(LiteralError),
        },
        Expr::Tuple(v) => Ok(PyValue::Tuple(
            v.into_iter().map(convert).collect::<Result<_, _>>()?,
        )),
        Expr::List(v) => Ok(PyValue::List(
            v.into_iter().map(convert).collect::<Result<_, _>>()?,
        )),
        Expr::Set(v) => {
            make_set(v.into_iter().map(convert).collect::<Result<_, _>>()?).ok_or(LiteralError)
        }
        Expr::EmptySetCall => Ok(PyValue::Set(vec![])),
        Expr::Dict(pairs) => {
            let mut out = Vec::with_capacity(pairs.len());
            for (k, v) in pairs {
                out.push((convert(k)?, convert(v)?));
            }
            make_dict(out).ok_or(LiteralError)
        }
        Expr::Unary(..) => convert_signed_num(e),
        Expr::Bin(l, plus, r) => {
            let left = convert_signed_num(*l)?;
            let right = convert_num(*r)?;
            let (lr, li) = match left {
                PyValue::Int(i) => (int_to_float(i)?, 0.0),
                PyValue::Float(f) => (f, 0.0),
                _ => return Err(LiteralError),
            };
            let _ = li;
            match right {
                PyValue::Complex(a, b) => Ok(if plus {
                    PyValue::Complex(lr + a, b)
                } else {
                    PyValue::Complex(lr - a, -b)
                }),
                _ => Err(LiteralError),
            }
        }
        Expr::Other => Err(LiteralError),
    }
}

fn int_to_float(i: PyInt) -> Result<f64, LiteralError> {
    i.to_f64().ok_or(LiteralError)
}

fn convert_num(e: Expr) -> Result<PyValue, LiteralError> {
    match e {
        Expr::Const(v @ (PyValue::Int(_) | PyValue::Float(_))) => Ok(v),
        Expr::Imag(v) => Ok(PyValue::Complex(0.0, v)),
        _ => Err(LiteralError),
    }
}

fn convert_signed_num(e: Expr) -> Result<PyValue, LiteralError> {
    if let Expr::Unary(plus, inner) = e {
        let v = convert_num(*inner)?;
        if plus {
            return Ok(v);
        }
        return Ok(match v {
            PyValue::Int(PyInt::Small(i)) => PyValue::Int(PyInt::Small(-i)),
            PyValue::Int(PyInt::Big(f)) => PyValue::Int(PyInt::Big(-f)),
            PyValue::Float(f) => PyValue::Float(-f),
            PyValue::Complex(a, b) => PyValue::Complex(-a, -b),
            _ => return Err(LiteralError),
        });
    }
    convert_num(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int(i: i128) -> PyValue {
        PyValue::Int(PyInt::Small(i))
    }

    #[test]
    fn json_accepts_what_cpython_accepts() {
        assert_eq!(
            json_loads(" [1, -2.5e1, true, null, \"a\\u0062\"] "),
            Ok(PyValue::List(vec![
                int(1),
                PyValue::Float(-25.0),
                PyValue::Bool(true),
                PyValue::None,
                PyValue::Str("ab".into())
            ]))
        );
        assert!(matches!(json_loads("NaN"), Ok(PyValue::Float(f)) if f.is_nan()));
        assert_eq!(
            json_loads("-Infinity"),
            Ok(PyValue::Float(f64::NEG_INFINITY))
        );
        assert_eq!(json_loads("1e400"), Ok(PyValue::Float(f64::INFINITY)));
        for bad in [
            "[1,]",
            "{'a': 1}",
            "01",
            "[1] x",
            "\"a\tb\"",
            "",
            "\u{feff}1",
            "1.",
            "-",
        ] {
            assert_eq!(json_loads(bad), Err(JsonError::Decode), "{bad:?}");
        }
        let deep = "[".repeat(2000);
        assert_eq!(json_loads(&deep), Err(JsonError::Other));
        let d = json_loads("{\"a\": 1, \"a\": 2}").unwrap();
        assert_eq!(d.dict_get(&PyValue::Str("a".into())), Some(&int(2)));
    }

    #[test]
    fn literal_eval_accepts_python_literals() {
        assert_eq!(
            literal_eval("[{\"bbox_2d\": (1, 2,), \"x\": True}, -3, 0x1f, 1_000, ...]  # c\n"),
            Ok(PyValue::List(vec![
                PyValue::Dict(vec![
                    (
                        PyValue::Str("bbox_2d".into()),
                        PyValue::Tuple(vec![int(1), int(2)])
                    ),
                    (PyValue::Str("x".into()), PyValue::Bool(true)),
                ]),
                int(-3),
                int(31),
                int(1000),
                PyValue::Ellipsis,
            ]))
        );
        assert_eq!(literal_eval("1 + 2j"), Ok(PyValue::Complex(1.0, 2.0)));
        assert_eq!(literal_eval("{1: 2, True: 3}").unwrap().py_len(), Some(1));
        assert_eq!(literal_eval("\"a\" \"b\""), Ok(PyValue::Str("ab".into())));
        assert_eq!(literal_eval("set()"), Ok(PyValue::Set(vec![])));
        assert_eq!(literal_eval("1,"), Ok(PyValue::Tuple(vec![int(1)])));
        for bad in [
            "1 + 2",
            "--1",
            "x",
            "[1 2]",
            "{[1]: 2}",
            "01",
            "f\"a\"",
            "1\n2",
            "[1][0]",
            "set([1])",
            "\"a\" b\"c\"",
            "1e",
            "(",
            "a.b",
        ] {
            assert_eq!(literal_eval(bad), Err(LiteralError), "{bad:?}");
        }
        // CPython 3.11's tokenizer on indentation (checked against ast.literal_eval)
        for good in [
            "[1]\n  \n",
            "[1]\n  # c",
            "[1]\n \x0c",
            "\n[1]",
            "\x0c[1]",
            "[1] \\\n  ",
            "\r\n[1]",
        ] {
            assert!(literal_eval(good).is_ok(), "{good:?}");
        }
        for bad in [
            "[1]\n  ",
            "[1]\n\t",
            "\n  [1]",
            "[1]\n\n  ",
            "[1]\r  ",
            "[1]#x\n  ",
            "[1] \\\n",
            "  ",
        ] {
            assert_eq!(literal_eval(bad), Err(LiteralError), "{bad:?}");
        }
        let ok = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(literal_eval(&ok).is_ok());
        let deep = format!("{}{}", "[".repeat(201), "]".repeat(201));
        assert_eq!(literal_eval(&deep), Err(LiteralError));
    }

    #[test]
    fn int_of_str_follows_python() {
        assert_eq!(py_int_from_str(" +1_000 "), Some(PyInt::Small(1000)));
        assert_eq!(py_int_from_str("-007"), Some(PyInt::Small(-7)));
        for bad in ["", "1.5", "1__0", "_1", "1_", "0x10", " "] {
            assert_eq!(py_int_from_str(bad), None, "{bad:?}");
        }
    }
}
