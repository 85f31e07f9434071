//! Constrained decoding for JSON output: a JSON Schema (a subset) compiled to
//! a [`Shape`], and a byte-level [`Cursor`] that says whether bytes can still
//! become a value of that shape. Each decode step masks the logits of tokens
//! whose bytes the cursor rejects ([`mask`]), so the output always parses and
//! validates, whatever the model prefers.
//!
//! Supported keywords: `type` (one or several), `properties`, `required`,
//! `additionalProperties`, `items`, `minItems`, `maxItems`, `minLength`,
//! `maxLength`, `enum`, `const`, `anyOf`, `oneOf` (alternatives that cannot
//! both match: as `anyOf`); `title`, `description`, `$schema`, `default`,
//! `examples` are ignored. Anything else that constrains (`pattern`,
//! `format`, `minimum`, `$ref`, ...) is refused, never silently dropped.
//! Objects with `properties` are written with every listed property, in the
//! schema's order, and no others: valid whether or not they are required.

use std::sync::Arc;

use serde_json::Value;

use super::error::EngineError;
use super::tokenizer::Tokenizer;

/// What a value must be.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    Any,
    Object {
        /// Written in this order, all of them.
        props: Vec<(String, Arc<Shape>)>,
        /// Without `props`: the shape of any key's value (`None`: no keys).
        values: Option<Arc<Shape>>,
    },
    Array {
        items: Arc<Shape>,
        min: usize,
        max: Option<usize>,
    },
    String {
        min: usize,
        max: Option<usize>,
    },
    Number {
        integer: bool,
    },
    Boolean,
    Null,
    /// One of these values, as compact JSON text.
    Literal(Vec<Vec<u8>>),
    AnyOf(Vec<Arc<Shape>>),
}

impl Shape {
    /// JSON mode: an object, anything inside.
    pub fn object() -> Self {
        Shape::Object {
            props: Vec::new(),
            values: Some(Arc::new(Shape::Any)),
        }
    }

    /// Compile a JSON Schema document.
    pub fn from_schema(schema: &Value) -> Result<Self, EngineError> {
        compile(schema, "#")
    }
}

fn bad(path: &str, m: impl std::fmt::Display) -> EngineError {
    EngineError::InvalidParams(format!("JSON schema at {path}: {m}"))
}

const IGNORED: &[&str] = &[
    "title",
    "description",
    "$schema",
    "$id",
    "$comment",
    "default",
    "examples",
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "minItems",
    "maxItems",
    "minLength",
    "maxLength",
    "enum",
    "const",
    "anyOf",
    "oneOf",
];

fn compile(s: &Value, path: &str) -> Result<Shape, EngineError> {
    let obj = match s {
        Value::Bool(true) => return Ok(Shape::Any),
        Value::Object(o) => o,
        _ => return Err(bad(path, "a schema is an object (or `true`)")),
    };
    if let Some(k) = obj.keys().find(|k| !IGNORED.contains(&k.as_str())) {
        return Err(bad(path, format!("`{k}` is not supported")));
    }
    if let Some(v) = obj.get("const") {
        return Ok(Shape::Literal(vec![compact(v)]));
    }
    if let Some(v) = obj.get("enum") {
        let values = v.as_array().ok_or_else(|| bad(path, "`enum` is a list"))?;
        if values.is_empty() {
            return Err(bad(path, "`enum` is empty"));
        }
        return Ok(Shape::Literal(values.iter().map(compact).collect()));
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(v) = obj.get(key) {
            let alts = v
                .as_array()
                .filter(|a| !a.is_empty())
                .ok_or_else(|| bad(path, format!("`{key}` is a non-empty list")))?;
            let alts = alts
                .iter()
                .enumerate()
                .map(|(i, a)| compile(a, &format!("{path}/{key}/{i}")).map(Arc::new))
                .collect::<Result<_, _>>()?;
            return Ok(Shape::AnyOf(alts));
        }
    }
    let usize_of = |k: &str| -> Result<Option<usize>, EngineError> {
        obj.get(k)
            .map(|v| {
                v.as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| bad(path, format!("`{k}` is a count")))
            })
            .transpose()
    };
    let types: Vec<&str> = match obj.get("type") {
        None => {
            if obj.contains_key("properties") {
                vec!["object"]
            } else if obj.contains_key("items") {
                vec!["array"]
            } else {
                return Ok(Shape::Any);
            }
        }
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts
            .iter()
            .map(|t| t.as_str().ok_or_else(|| bad(path, "`type` lists names")))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad(path, "`type` is a name or a list of names")),
    };
    let mut shapes = Vec::new();
    for t in types {
        shapes.push(match t {
            "string" => {
                let (min, max) = (usize_of("minLength")?.unwrap_or(0), usize_of("maxLength")?);
                if max.is_some_and(|m| m < min) {
                    return Err(bad(path, "maxLength < minLength"));
                }
                Shape::String { min, max }
            }
            "number" => Shape::Number { integer: false },
            "integer" => Shape::Number { integer: true },
            "boolean" => Shape::Boolean,
            "null" => Shape::Null,
            "array" => {
                let items = match obj.get("items") {
                    Some(i) => compile(i, &format!("{path}/items"))?,
                    None => Shape::Any,
                };
                let (min, max) = (usize_of("minItems")?.unwrap_or(0), usize_of("maxItems")?);
                if max.is_some_and(|m| m < min) {
                    return Err(bad(path, "maxItems < minItems"));
                }
                Shape::Array {
                    items: Arc::new(items),
                    min,
                    max,
                }
            }
            "object" => {
                let mut props = Vec::new();
                if let Some(p) = obj.get("properties") {
                    let p = p
                        .as_object()
                        .ok_or_else(|| bad(path, "`properties` is an object"))?;
                    for (name, s) in p {
                        let s = compile(s, &format!("{path}/properties/{name}"))?;
                        props.push((name.clone(), Arc::new(s)));
                    }
                }
                if let Some(r) = obj.get("required").and_then(Value::as_array) {
                    for name in r.iter().filter_map(Value::as_str) {
                        if !props.is_empty() && !props.iter().any(|(n, _)| n == name) {
                            return Err(bad(
                                path,
                                format!("required `{name}` is not among the properties"),
                            ));
                        }
                    }
                }
                // With properties, only they are written (valid either way).
                let values = match obj.get("additionalProperties") {
                    _ if !props.is_empty() => None,
                    Some(Value::Bool(false)) => None,
                    Some(Value::Bool(true)) | None => Some(Arc::new(Shape::Any)),
                    Some(s) => Some(Arc::new(compile(
                        s,
                        &format!("{path}/additionalProperties"),
                    )?)),
                };
                Shape::Object { props, values }
            }
            other => return Err(bad(path, format!("unknown type `{other}`"))),
        });
    }
    Ok(if shapes.len() == 1 {
        shapes.remove(0)
    } else {
        Shape::AnyOf(shapes.into_iter().map(Arc::new).collect())
    })
}

fn compact(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// Indentation after a newline in one gap, at most.
const MAX_INDENT: u8 = 8;
/// Digits in a number, at most.
const MAX_DIGITS: u8 = 24;

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// Whitespace in one gap between JSON tokens, as llama.cpp's JSON grammar
/// bounds it: nothing, one space, or a newline and up to `MAX_INDENT`
/// spaces or tabs. (A model that would rather write prose otherwise fills
/// its budget with blank lines.) `ws` counts: 0 none, 1 a space, 2 + n a
/// newline and n indents.
fn ws_step(ws: &mut u8, b: u8) -> bool {
    match (*ws, b) {
        (0, b' ') => *ws = 1,
        (0, b'\n') => *ws = 2,
        (n, b' ' | b'\t') if n >= 2 && n - 2 < MAX_INDENT => *ws += 1,
        _ => return false,
    }
    true
}

/// What a byte did to a value being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Feed {
    /// Part of the value.
    Took,
    /// The value was already complete; the byte is the parent's.
    Done,
    /// Cannot be.
    Bad,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    E,
    ESign,
    Exp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Str {
    Chars,
    Escape,
    Hex(u8),
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Obj {
    /// After `{`: a key or `}`.
    KeyOrClose,
    /// After `,`: a key.
    Key,
    /// Reading a key (the child).
    InKey,
    Colon,
    /// Before and while reading a value (the child).
    Value,
    CommaOrClose,
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arr {
    ValueOrClose,
    Value,
    CommaOrClose,
    Closed,
}

/// A value being read.
#[derive(Debug, Clone)]
enum Node {
    /// Whitespace, then the value's first byte decides.
    Start {
        shape: Arc<Shape>,
        ws: u8,
    },
    String {
        st: Str,
        /// Characters so far.
        len: usize,
        min: usize,
        max: Option<usize>,
        /// Continuation bytes the current character still needs, and the
        /// range the next one must be in (UTF-8 must stay valid: a string
        /// may not end, or go on, inside a character).
        utf8: (u8, u8, u8),
    },
    Number {
        st: Num,
        integer: bool,
        digits: u8,
    },
    /// The alive options of literal texts (`true`, an enum's values).
    Literal {
        options: Vec<Vec<u8>>,
        pos: usize,
    },
    Object {
        props: Arc<Shape>,
        st: Obj,
        /// Properties written so far.
        next: usize,
        child: Option<Box<Node>>,
        ws: u8,
    },
    Array {
        shape: Arc<Shape>,
        st: Arr,
        count: usize,
        child: Option<Box<Node>>,
        ws: u8,
    },
    Alt(Vec<Node>),
}

fn literal(options: Vec<Vec<u8>>) -> Node {
    Node::Literal { options, pos: 0 }
}

fn string_literal(s: &str) -> Vec<u8> {
    compact(&Value::String(s.to_owned()))
}

impl Node {
    fn start(shape: Arc<Shape>) -> Self {
        Node::Start { shape, ws: 0 }
    }

    /// Whether what was read is a whole value.
    fn complete(&self) -> bool {
        match self {
            Node::Start { .. } => false,
            Node::String { st, .. } => *st == Str::Closed,
            Node::Number { st, .. } => matches!(st, Num::Zero | Num::Int | Num::Frac | Num::Exp),
            Node::Literal { options, pos } => options.iter().any(|o| o.len() == *pos),
            Node::Object { st, .. } => *st == Obj::Closed,
            Node::Array { st, .. } => *st == Arr::Closed,
            Node::Alt(alts) => alts.iter().any(Node::complete),
        }
    }

    /// Whether more bytes could still belong to this value.
    fn open(&self) -> bool {
        match self {
            Node::String { st, .. } => *st != Str::Closed,
            Node::Object { st, .. } => *st != Obj::Closed,
            Node::Array { st, .. } => *st != Arr::Closed,
            Node::Literal { options, pos } => options.iter().any(|o| o.len() > *pos),
            Node::Alt(alts) => alts.iter().any(Node::open),
            Node::Start { .. } | Node::Number { .. } => true,
        }
    }

    /// The node a value of `shape` becomes on its first byte `b`.
    fn begin(shape: &Arc<Shape>, b: u8) -> Option<Node> {
        let node = match (&**shape, b) {
            (Shape::Any, _) => {
                let alts: Vec<Node> = [
                    Shape::object(),
                    Shape::Array {
                        items: Arc::new(Shape::Any),
                        min: 0,
                        max: None,
                    },
                    Shape::String { min: 0, max: None },
                    Shape::Number { integer: false },
                    Shape::Boolean,
                    Shape::Null,
                ]
                .into_iter()
                .filter_map(|s| Node::begin(&Arc::new(s), b))
                .collect();
                return alts.into_iter().next();
            }
            (Shape::Object { .. }, b'{') => Node::Object {
                props: shape.clone(),
                st: Obj::KeyOrClose,
                next: 0,
                child: None,
                ws: 0,
            },
            (Shape::Array { .. }, b'[') => Node::Array {
                shape: shape.clone(),
                st: Arr::ValueOrClose,
                count: 0,
                child: None,
                ws: 0,
            },
            (Shape::String { min, max }, b'"') => Node::String {
                st: Str::Chars,
                len: 0,
                min: *min,
                max: *max,
                utf8: (0, 0, 0),
            },
            (Shape::Number { integer }, b'-') => Node::Number {
                st: Num::Minus,
                integer: *integer,
                digits: 0,
            },
            (Shape::Number { integer }, b'0') => Node::Number {
                st: Num::Zero,
                integer: *integer,
                digits: 1,
            },
            (Shape::Number { integer }, b'1'..=b'9') => Node::Number {
                st: Num::Int,
                integer: *integer,
                digits: 1,
            },
            (Shape::Boolean, _) => {
                let mut n = literal(vec![b"true".to_vec(), b"false".to_vec()]);
                return (n.feed(b) == Feed::Took).then_some(n);
            }
            (Shape::Null, _) => {
                let mut n = literal(vec![b"null".to_vec()]);
                return (n.feed(b) == Feed::Took).then_some(n);
            }
            (Shape::Literal(options), _) => {
                let mut n = literal(options.clone());
                return (n.feed(b) == Feed::Took).then_some(n);
            }
            (Shape::AnyOf(alts), _) => {
                let alive: Vec<Node> = alts.iter().filter_map(|s| Node::begin(s, b)).collect();
                return match alive.len() {
                    0 => None,
                    1 => alive.into_iter().next(),
                    _ => Some(Node::Alt(alive)),
                };
            }
            _ => return None,
        };
        Some(node)
    }

    fn feed(&mut self, b: u8) -> Feed {
        match self {
            Node::Start { shape, ws } => {
                if is_ws(b) {
                    return if ws_step(ws, b) {
                        Feed::Took
                    } else {
                        Feed::Bad
                    };
                }
                match Node::begin(shape, b) {
                    Some(n) => {
                        *self = n;
                        Feed::Took
                    }
                    None => Feed::Bad,
                }
            }
            Node::String {
                st,
                len,
                min,
                max,
                utf8,
            } => match *st {
                Str::Closed => Feed::Done,
                Str::Chars if utf8.0 > 0 => {
                    if !(utf8.1..=utf8.2).contains(&b) {
                        return Feed::Bad;
                    }
                    *utf8 = (utf8.0 - 1, 0x80, 0xbf);
                    Feed::Took
                }
                Str::Chars => {
                    let next = match b {
                        b'"' if *len >= *min => {
                            *st = Str::Closed;
                            return Feed::Took;
                        }
                        b'"' | 0..=0x1f | 0x80..=0xc1 | 0xf5..=0xff => return Feed::Bad,
                        _ if max.is_some_and(|m| *len >= m) => return Feed::Bad,
                        b'\\' => {
                            *st = Str::Escape;
                            (0, 0, 0)
                        }
                        0x20..=0x7f => (0, 0, 0),
                        0xc2..=0xdf => (1, 0x80, 0xbf),
                        0xe0 => (2, 0xa0, 0xbf),
                        0xed => (2, 0x80, 0x9f),
                        0xe1..=0xef => (2, 0x80, 0xbf),
                        0xf0 => (3, 0x90, 0xbf),
                        0xf4 => (3, 0x80, 0x8f),
                        0xf1..=0xf3 => (3, 0x80, 0xbf),
                    };
                    *utf8 = next;
                    *len += 1;
                    Feed::Took
                }
                Str::Escape => match b {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {
                        *st = Str::Chars;
                        Feed::Took
                    }
                    b'u' => {
                        *st = Str::Hex(4);
                        Feed::Took
                    }
                    _ => Feed::Bad,
                },
                Str::Hex(n) => {
                    if !b.is_ascii_hexdigit() {
                        return Feed::Bad;
                    }
                    *st = if n == 1 { Str::Chars } else { Str::Hex(n - 1) };
                    Feed::Took
                }
            },
            Node::Number {
                st,
                integer,
                digits,
            } => {
                let digit = b.is_ascii_digit();
                if digit {
                    *digits += 1;
                    if *digits > MAX_DIGITS {
                        return Feed::Bad;
                    }
                }
                let next = match (*st, b) {
                    (Num::Minus, b'0') => Num::Zero,
                    (Num::Minus, b'1'..=b'9') => Num::Int,
                    (Num::Int, b'0'..=b'9') => Num::Int,
                    (Num::Zero | Num::Int, b'.') if !*integer => Num::Dot,
                    (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') if !*integer => Num::E,
                    (Num::Dot | Num::Frac, b'0'..=b'9') => Num::Frac,
                    (Num::E, b'+' | b'-') => Num::ESign,
                    (Num::E | Num::ESign | Num::Exp, b'0'..=b'9') => Num::Exp,
                    _ => {
                        return if self.complete() {
                            Feed::Done
                        } else {
                            Feed::Bad
                        }
                    }
                };
                *st = next;
                Feed::Took
            }
            Node::Literal { options, pos } => {
                let p = *pos;
                let complete = options.iter().any(|o| o.len() == p);
                options.retain(|o| o.get(p) == Some(&b));
                if options.is_empty() {
                    return if complete { Feed::Done } else { Feed::Bad };
                }
                *pos += 1;
                Feed::Took
            }
            Node::Alt(alts) => {
                let results: Vec<Feed> = alts.iter_mut().map(|a| a.feed(b)).collect();
                if results.contains(&Feed::Took) {
                    let mut i = 0;
                    alts.retain(|_| {
                        i += 1;
                        results[i - 1] == Feed::Took
                    });
                    if alts.len() == 1 {
                        let only = alts.pop().expect("one");
                        *self = only;
                    }
                    Feed::Took
                } else if results.contains(&Feed::Done) {
                    Feed::Done
                } else {
                    Feed::Bad
                }
            }
            Node::Object { .. } => self.feed_object(b),
            Node::Array { .. } => self.feed_array(b),
        }
    }

    fn feed_object(&mut self, b: u8) -> Feed {
        let Node::Object {
            props,
            st,
            next,
            child,
            ws,
        } = self
        else {
            unreachable!()
        };
        let Shape::Object {
            props: list,
            values,
        } = &**props
        else {
            return Feed::Bad;
        };
        let free = list.is_empty() && values.is_some();
        // A child being read takes the byte first.
        if let Some(c) = child {
            match c.feed(b) {
                Feed::Took => return Feed::Took,
                Feed::Bad => return Feed::Bad,
                Feed::Done => {
                    *child = None;
                    *ws = 0;
                    match *st {
                        Obj::InKey => *st = Obj::Colon,
                        Obj::Value => {
                            *next += 1;
                            *st = Obj::CommaOrClose;
                        }
                        _ => return Feed::Bad,
                    }
                }
            }
        }
        if is_ws(b) && *st != Obj::Closed {
            return if ws_step(ws, b) {
                Feed::Took
            } else {
                Feed::Bad
            };
        }
        *ws = 0;
        let key = |i: usize| -> Box<Node> {
            if free {
                Box::new(Node::String {
                    st: Str::Chars,
                    len: 0,
                    min: 0,
                    max: None,
                    utf8: (0, 0, 0),
                })
            } else {
                Box::new(literal(vec![string_literal(&list[i].0)]))
            }
        };
        match (*st, b) {
            (Obj::Closed, _) => Feed::Done,
            (Obj::KeyOrClose, b'}') if free || *next == list.len() => {
                *st = Obj::Closed;
                Feed::Took
            }
            (Obj::KeyOrClose | Obj::Key, b'"') if free || *next < list.len() => {
                let mut k = key(*next);
                if free {
                    // The opening quote starts the free key's string.
                    *child = Some(k);
                    *st = Obj::InKey;
                    return Feed::Took;
                }
                if k.feed(b) != Feed::Took {
                    return Feed::Bad;
                }
                *child = Some(k);
                *st = Obj::InKey;
                Feed::Took
            }
            (Obj::Colon, b':') => {
                let shape = match values {
                    Some(v) if free => v.clone(),
                    _ => list[*next].1.clone(),
                };
                *child = Some(Box::new(Node::start(shape)));
                *st = Obj::Value;
                Feed::Took
            }
            (Obj::CommaOrClose, b',') if free || *next < list.len() => {
                *st = Obj::Key;
                Feed::Took
            }
            (Obj::CommaOrClose, b'}') if free || *next == list.len() => {
                *st = Obj::Closed;
                Feed::Took
            }
            _ => Feed::Bad,
        }
    }

    fn feed_array(&mut self, b: u8) -> Feed {
        let Node::Array {
            shape,
            st,
            count,
            child,
            ws,
        } = self
        else {
            unreachable!()
        };
        let Shape::Array { items, min, max } = &**shape else {
            return Feed::Bad;
        };
        if let Some(c) = child {
            match c.feed(b) {
                Feed::Took => return Feed::Took,
                Feed::Bad => return Feed::Bad,
                Feed::Done => {
                    *child = None;
                    *ws = 0;
                    *count += 1;
                    *st = Arr::CommaOrClose;
                }
            }
        }
        if is_ws(b) && *st != Arr::Closed {
            return if ws_step(ws, b) {
                Feed::Took
            } else {
                Feed::Bad
            };
        }
        *ws = 0;
        match (*st, b) {
            (Arr::Closed, _) => Feed::Done,
            (Arr::ValueOrClose, b']') if *min == 0 => {
                *st = Arr::Closed;
                Feed::Took
            }
            (Arr::ValueOrClose | Arr::Value, _) if max.is_none_or(|m| *count < m) => {
                let mut c = Box::new(Node::start(items.clone()));
                if c.feed(b) != Feed::Took {
                    return Feed::Bad;
                }
                *child = Some(c);
                *st = Arr::Value;
                Feed::Took
            }
            (Arr::CommaOrClose, b',') if max.is_none_or(|m| *count < m) => {
                *st = Arr::Value;
                Feed::Took
            }
            (Arr::CommaOrClose, b']') if *count >= *min => {
                *st = Arr::Closed;
                Feed::Took
            }
            _ => Feed::Bad,
        }
    }
}

/// Where the output is in the value it must be.
#[derive(Debug, Clone)]
pub struct Cursor {
    root: Node,
}

impl Cursor {
    pub fn new(shape: Arc<Shape>) -> Self {
        Self {
            root: Node::start(shape),
        }
    }

    /// Read `bytes`; `false` (and a cursor to drop) if they cannot be part
    /// of the value. Nothing may follow a whole value.
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| self.root.feed(b) == Feed::Took)
    }

    /// A whole value has been read (the output may end).
    pub fn complete(&self) -> bool {
        self.root.complete()
    }

    /// Only the end may come next.
    pub fn finished(&self) -> bool {
        self.complete() && !self.root.open()
    }
}

/// Candidates looked at first: the most likely tokens by far.
const FIRST_LOOK: usize = 512;

/// Keep only the logits of tokens the cursor accepts, among the most likely
/// ones: the `want` best allowed tokens survive (end-of-generation only once
/// the value is whole), everything else becomes `-inf`. When the value is
/// finished, the end-of-generation token is the only choice.
pub fn mask(
    cursor: &Cursor,
    row: &mut [f32],
    tokenizer: &Tokenizer,
    want: usize,
) -> Result<(), EngineError> {
    let eog = tokenizer
        .eog()
        .first()
        .copied()
        .or(tokenizer.eos())
        .ok_or_else(|| {
            EngineError::InvalidParams("JSON output needs an end-of-text token".into())
        })?;
    if cursor.finished() {
        row.fill(f32::NEG_INFINITY);
        if let Some(l) = row.get_mut(eog as usize) {
            *l = 0.0;
        }
        return Ok(());
    }
    let allowed = |t: u32| -> bool {
        if tokenizer.is_eog(t) {
            return cursor.complete();
        }
        if tokenizer.is_special(t) {
            return false;
        }
        let bytes = tokenizer.token_bytes(t);
        !bytes.is_empty() && cursor.clone().feed(&bytes)
    };
    let mut order: Vec<u32> = (0..row.len() as u32)
        .filter(|&t| row[t as usize].is_finite())
        .collect();
    let desc = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
    let want = want.max(1);
    let mut keep = Vec::with_capacity(want);
    let first = FIRST_LOOK.min(order.len());
    if first < order.len() && first > 0 {
        order.select_nth_unstable_by(first - 1, desc);
    }
    order[..first].sort_unstable_by(desc);
    for &t in &order[..first] {
        if allowed(t) {
            keep.push(t);
            if keep.len() == want {
                break;
            }
        }
    }
    if keep.is_empty() {
        // Nothing likely fits: take the most likely of the rest that does.
        let rest = &mut order[first..];
        rest.sort_unstable_by(desc);
        if let Some(&t) = rest.iter().find(|&&t| allowed(t)) {
            keep.push(t);
        }
    }
    if keep.is_empty() {
        return Err(EngineError::InvalidParams(
            "no token of the vocabulary can continue the JSON output".into(),
        ));
    }
    let kept: Vec<(u32, f32)> = keep.iter().map(|&t| (t, row[t as usize])).collect();
    row.fill(f32::NEG_INFINITY);
    for (t, l) in kept {
        row[t as usize] = l;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn accepts(schema: &Value, text: &str) -> bool {
        let shape = Arc::new(Shape::from_schema(schema).unwrap());
        let mut c = Cursor::new(shape);
        c.feed(text.as_bytes()) && c.complete()
    }

    #[test]
    fn values_of_the_schema_are_accepted_and_others_refused() {
        let person = json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 8},
                "age": {"type": "integer"},
                "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
                "pet": {"type": ["string", "null"]}
            },
            "required": ["name", "age"]
        });
        assert!(accepts(
            &person,
            r#"{"name":"Ann","age":41,"tags":["a"],"pet":null}"#
        ));
        assert!(accepts(
            &person,
            "{\n  \"name\": \"Bo\\\"b\",\n  \"age\": -7,\n  \"tags\": [],\n  \"pet\": \"cat\"\n}"
        ));
        for bad in [
            r#"{"age":41,"name":"Ann","tags":[],"pet":null}"#, // order
            r#"{"name":"Annabelle!","age":1,"tags":[],"pet":null}"#, // too long
            r#"{"name":"Ann","age":4.5,"tags":[],"pet":null}"#, // not an integer
            r#"{"name":"Ann","age":4,"tags":["c"],"pet":null}"#, // not in the enum
            r#"{"name":"Ann","age":4,"tags":["a","b","a"],"pet":null}"#, // too many
            r#"{"name":"Ann","age":4,"tags":[],"pet":1}"#,     // wrong type
            r#"{"name":"Ann","age":4,"tags":[],"pet":null} "#, // trailing
            r#"{"name":"Ann","age":04,"tags":[],"pet":null}"#, // leading zero
        ] {
            assert!(!accepts(&person, bad), "{bad}");
        }
        // Incomplete is not complete.
        let shape = Arc::new(Shape::from_schema(&person).unwrap());
        let mut c = Cursor::new(shape);
        assert!(c.feed(br#"{"name":"A"#));
        assert!(!c.complete());
    }

    #[test]
    fn json_mode_takes_any_object() {
        let shape = Arc::new(Shape::object());
        for ok in [
            "{}",
            r#"{"a":[1,2.5e-3,true,null,{"b":"\u00e9x"}],"c":"ü"}"#,
            " {\"x\" : { } }",
        ] {
            let mut c = Cursor::new(shape.clone());
            assert!(c.feed(ok.as_bytes()) && c.finished(), "{ok}");
        }
        for bad in ["[1]", "\"s\"", "{\"a\":}", "{\"a\" 1}", "{,}", "{\"a\":1,}"] {
            let mut c = Cursor::new(shape.clone());
            assert!(!(c.feed(bad.as_bytes()) && c.complete()), "{bad}");
        }
    }

    #[test]
    fn numbers_end_where_the_parent_says_and_literals_may_be_prefixes() {
        let n = json!({"type": "array", "items": {"type": "number"}});
        assert!(accepts(&n, "[1, -0.5, 3e+2, 10]"));
        assert!(!accepts(&n, "[1.]"));
        let e = json!({"enum": [1, 10, "x"]});
        assert!(accepts(&e, "1") && accepts(&e, "10") && accepts(&e, "\"x\""));
        assert!(!accepts(&e, "100"));
    }

    #[test]
    fn strings_stay_valid_utf8_and_count_characters() {
        let s = json!({"type": "string", "maxLength": 2});
        assert!(accepts(&s, "\"é€\""));
        assert!(!accepts(&s, "\"é€a\""));
        let shape = Arc::new(Shape::from_schema(&s).unwrap());
        for bad in [
            &b"\"\xe2\x82\""[..],
            b"\"\x82\"",
            b"\"\xc0\xaf\"",
            b"\"\xed\xa0\x80\"",
        ] {
            let mut c = Cursor::new(shape.clone());
            assert!(!(c.feed(bad) && c.complete()), "{bad:?}");
        }
    }

    #[test]
    fn closed_objects_take_no_other_keys() {
        let empty = json!({"type": "object", "additionalProperties": false});
        assert!(accepts(&empty, "{}") && !accepts(&empty, r#"{"a":1}"#));
        let strings = json!({"type": "object", "additionalProperties": {"type": "string"}});
        assert!(accepts(&strings, r#"{"a":"x","b":"y"}"#) && !accepts(&strings, r#"{"a":1}"#));
    }

    #[test]
    fn unsupported_keywords_are_refused() {
        for s in [
            json!({"type": "string", "pattern": "a+"}),
            json!({"$ref": "#/defs/x"}),
            json!({"type": "number", "minimum": 0}),
            json!({"type": "wat"}),
        ] {
            assert!(Shape::from_schema(&s).is_err(), "{s}");
        }
    }
}
