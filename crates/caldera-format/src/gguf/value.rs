//! Metadata values: the thirteen GGUF value types, typed accessors that tolerate the
//! integer and float widths that converters choose, and constructors for writers.

use std::fmt;

/// A metadata value type as stored in a GGUF file (a little-endian `u32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum GgufValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl GgufValueType {
    /// The type for a stored id, or `None` for ids GGUF does not define.
    pub fn from_id(id: u32) -> Option<GgufValueType> {
        use GgufValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    pub fn id(self) -> u32 {
        self as u32
    }

    /// The fewest bytes one value of this type occupies in a file: the fixed width of
    /// a scalar, the 8-byte length of a string, the 4-byte type plus 8-byte count of an
    /// array. Count × this bounds how many values the remaining bytes can hold.
    pub fn min_encoded_size(self) -> u64 {
        use GgufValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 => 8,
            String => 8,
            Array => 12,
        }
    }

    pub fn name(self) -> &'static str {
        use GgufValueType::*;
        match self {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            Bool => "bool",
            String => "string",
            Array => "array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
        }
    }
}

impl fmt::Display for GgufValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An array value. Every item has type `elem_type`; items of an `Array` element type
/// are arrays themselves, each with its own element type (nesting depth is limited to
/// [`MAX_ARRAY_DEPTH`](super::MAX_ARRAY_DEPTH)).
#[derive(Clone, Debug, PartialEq)]
pub struct GgufArray {
    pub elem_type: GgufValueType,
    pub items: Vec<GgufValue>,
}

impl GgufArray {
    pub fn new(elem_type: GgufValueType, items: Vec<GgufValue>) -> GgufArray {
        GgufArray { elem_type, items }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(GgufArray),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    pub fn value_type(&self) -> GgufValueType {
        match self {
            GgufValue::U8(_) => GgufValueType::U8,
            GgufValue::I8(_) => GgufValueType::I8,
            GgufValue::U16(_) => GgufValueType::U16,
            GgufValue::I16(_) => GgufValueType::I16,
            GgufValue::U32(_) => GgufValueType::U32,
            GgufValue::I32(_) => GgufValueType::I32,
            GgufValue::F32(_) => GgufValueType::F32,
            GgufValue::Bool(_) => GgufValueType::Bool,
            GgufValue::String(_) => GgufValueType::String,
            GgufValue::Array(_) => GgufValueType::Array,
            GgufValue::U64(_) => GgufValueType::U64,
            GgufValue::I64(_) => GgufValueType::I64,
            GgufValue::F64(_) => GgufValueType::F64,
        }
    }

    /// The value of any integer type as an `i128` (wide enough for every one of them).
    fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            GgufValue::U8(v) => v.into(),
            GgufValue::I8(v) => v.into(),
            GgufValue::U16(v) => v.into(),
            GgufValue::I16(v) => v.into(),
            GgufValue::U32(v) => v.into(),
            GgufValue::I32(v) => v.into(),
            GgufValue::U64(v) => v.into(),
            GgufValue::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// Any integer type holding a non-negative value.
    pub fn as_u64(&self) -> Option<u64> {
        self.as_i128().and_then(|v| u64::try_from(v).ok())
    }

    /// Any integer type whose value fits an `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        self.as_i128().and_then(|v| i64::try_from(v).ok())
    }

    /// Any numeric type (integers convert, possibly rounding beyond 2^53).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i128().map(|v| v as f64),
        }
    }

    /// Any numeric type, rounded to `f32`.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            GgufValue::F32(v) => Some(v),
            _ => self.as_f64().map(|v| v as f32),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&GgufArray> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// An array whose items are all strings.
    pub fn as_str_array(&self) -> Option<Vec<&str>> {
        self.as_array()?.items.iter().map(|v| v.as_str()).collect()
    }

    /// An array whose items are all numeric, converted to `f32`.
    pub fn as_f32_array(&self) -> Option<Vec<f32>> {
        self.as_array()?.items.iter().map(|v| v.as_f32()).collect()
    }

    /// An array whose items are all integers that fit an `i64`.
    pub fn as_i64_array(&self) -> Option<Vec<i64>> {
        self.as_array()?.items.iter().map(|v| v.as_i64()).collect()
    }

    pub fn string(s: impl Into<String>) -> GgufValue {
        GgufValue::String(s.into())
    }

    /// An array of strings.
    pub fn str_array<S: AsRef<str>>(items: &[S]) -> GgufValue {
        GgufValue::Array(GgufArray::new(
            GgufValueType::String,
            items
                .iter()
                .map(|s| GgufValue::String(s.as_ref().to_owned()))
                .collect(),
        ))
    }

    pub fn f32_array(items: &[f32]) -> GgufValue {
        GgufValue::Array(GgufArray::new(
            GgufValueType::F32,
            items.iter().map(|&v| GgufValue::F32(v)).collect(),
        ))
    }

    pub fn i32_array(items: &[i32]) -> GgufValue {
        GgufValue::Array(GgufArray::new(
            GgufValueType::I32,
            items.iter().map(|&v| GgufValue::I32(v)).collect(),
        ))
    }

    pub fn u32_array(items: &[u32]) -> GgufValue {
        GgufValue::Array(GgufArray::new(
            GgufValueType::U32,
            items.iter().map(|&v| GgufValue::U32(v)).collect(),
        ))
    }

    pub fn bool_array(items: &[bool]) -> GgufValue {
        GgufValue::Array(GgufArray::new(
            GgufValueType::Bool,
            items.iter().map(|&v| GgufValue::Bool(v)).collect(),
        ))
    }

    /// An array of any element type; the writer checks that every item has that type.
    pub fn array(elem_type: GgufValueType, items: Vec<GgufValue>) -> GgufValue {
        GgufValue::Array(GgufArray::new(elem_type, items))
    }
}

impl From<&str> for GgufValue {
    fn from(s: &str) -> GgufValue {
        GgufValue::String(s.to_owned())
    }
}

impl From<String> for GgufValue {
    fn from(s: String) -> GgufValue {
        GgufValue::String(s)
    }
}

macro_rules! from_scalar {
    ($($t:ty => $v:ident),*) => {$(
        impl From<$t> for GgufValue {
            fn from(x: $t) -> GgufValue {
                GgufValue::$v(x)
            }
        }
    )*};
}
from_scalar!(u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32, f32 => F32,
    bool => Bool, u64 => U64, i64 => I64, f64 => F64, GgufArray => Array);
