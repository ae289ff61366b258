//! Predicted boxes and their IoU against a segmentation mask or a ground-truth box:
//! `medical.py::extract_json_from_response` and `calculate_bbox_iou` (spec §8.6), in the
//! reference's exact semantics and in a fixed form.
//!
//! The mask branch never draws a box mask: a summed-area table of the mask ([`MaskIndex`])
//! gives the intersection of any inclusive pixel box in O(1).

use crate::pyvalue::{JsonError, PyInt, PyValue, py_int_from_str};
use crate::text::{py_is_space, py_strip};
use qoq_core::SegMask;
use std::cmp::Ordering;

/// A segmentation mask prepared for O(1) box intersections (summed-area table of `mask > 0`).
#[derive(Debug, Clone)]
pub struct MaskIndex {
    width: usize,
    height: usize,
    count: u64,
    /// `(height + 1) x (width + 1)`, row-major; `sat[y][x]` = foreground pixels above-left.
    sat: Vec<u32>,
}

impl MaskIndex {
    /// Build the table in one pass over the mask.
    pub fn new(mask: &SegMask) -> Self {
        let (w, h) = (mask.width(), mask.height());
        let data = mask.data();
        let mut sat = vec![0u32; (w + 1) * (h + 1)];
        for y in 0..h {
            let mut row = 0u32;
            let row_px = &data[y * w..(y + 1) * w];
            let (prev, cur) = sat.split_at_mut((y + 1) * (w + 1));
            let prev = &prev[y * (w + 1)..];
            for x in 0..w {
                row += (row_px[x] > 0) as u32;
                cur[x + 1] = prev[x + 1] + row;
            }
        }
        let count = sat[(w + 1) * (h + 1) - 1] as u64;
        Self {
            width: w,
            height: h,
            count,
            sat,
        }
    }

    /// Mask width in pixels.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Mask height in pixels.
    pub fn height(&self) -> usize {
        self.height
    }

    /// Number of foreground pixels.
    pub fn foreground(&self) -> u64 {
        self.count
    }

    /// Foreground pixels in the inclusive box `[x1..=x2] x [y1..=y2]` (already clipped).
    fn box_sum(&self, x1: usize, y1: usize, x2: usize, y2: usize) -> u64 {
        let s = |x: usize, y: usize| self.sat[y * (self.width + 1) + x] as i64;
        (s(x2 + 1, y2 + 1) - s(x1, y2 + 1) - s(x2 + 1, y1) + s(x1, y1)) as u64
    }

    /// `bbox_to_mask` then intersection and union: integer box corners clipped to the image,
    /// swapped when reversed, inclusive pixels, empty unless `x1 < x2` and `y1 < y2`.
    /// Returns `(intersection, union)` pixel counts.
    pub fn box_counts(&self, b: [i128; 4]) -> (u64, u64) {
        let clip = |v: i128, n: usize| v.clamp(0, n.saturating_sub(1) as i128) as usize;
        let (mut x1, mut y1) = (clip(b[0], self.width), clip(b[1], self.height));
        let (mut x2, mut y2) = (clip(b[2], self.width), clip(b[3], self.height));
        if x1 > x2 {
            std::mem::swap(&mut x1, &mut x2);
        }
        if y1 > y2 {
            std::mem::swap(&mut y1, &mut y2);
        }
        if !(x1 < x2 && y1 < y2) {
            return (0, self.count);
        }
        let inter = self.box_sum(x1, y1, x2, y2);
        let area = ((x2 - x1 + 1) * (y2 - y1 + 1)) as u64;
        (inter, area + self.count - inter)
    }
}

/// The reference raised a Python exception here (its caller's bare `except` swallows it, or it
/// escapes the released reward function).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Raised;

/// `extract_json_from_response`: the fenced blocks of `re.findall(r"```(?:json)?\s*([\s\S]*?)```")`.
pub fn fenced_blocks(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let finder = &*crate::text::finders::FENCE;
    let mut pos = 0;
    while let Some(a) = finder.find(&text.as_bytes()[pos..]) {
        let mut j = pos + a + 3;
        if text[j..].starts_with("json") {
            j += 4;
        }
        let rest = &text[j..];
        j += rest.len() - rest.trim_start_matches(py_is_space).len();
        let Some(c) = finder.find(&text.as_bytes()[j..]) else {
            break;
        };
        out.push(&text[j..j + c]);
        pos = j + c + 3;
    }
    out
}

/// The first fenced block that `json.loads` accepts, else the first that the quote-swapped
/// `ast.literal_eval` accepts. `Err(Raised)` where the reference raises out of the reward
/// (a `RecursionError`/`ValueError` from `json.loads`).
pub fn extract_json(text: &str) -> Result<Option<PyValue>, Raised> {
    extract_json_cached(text, crate::format::ParseMemo::default())
}

/// [`extract_json`] reusing what the format score parsed.
pub fn extract_json_cached(
    text: &str,
    mut memo: crate::format::ParseMemo<'_>,
) -> Result<Option<PyValue>, Raised> {
    let blocks = fenced_blocks(text);
    for m in &blocks {
        match memo.json_loads(py_strip(m)) {
            Ok(v) => return Ok(Some(v)),
            Err(JsonError::Decode) => continue,
            Err(JsonError::Other) => return Err(Raised),
        }
    }
    for m in &blocks {
        if let Ok(v) = memo.literal_eval(&py_strip(m).replace('\'', "\"")) {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

/// The `bbox_2d` values of the parsed JSON: every dict item of a list, the dict itself, or the
/// items of its `objects_of_interest`.
pub fn collect_bboxes(json: &PyValue) -> Vec<PyValue> {
    let from_items = |items: &[PyValue]| {
        items
            .iter()
            .filter_map(|it| match it {
                PyValue::Dict(_) => it.dict_get_str("bbox_2d").cloned(),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    match json {
        PyValue::List(items) => from_items(items),
        PyValue::Dict(_) => {
            if let Some(b) = json.dict_get_str("bbox_2d") {
                vec![b.clone()]
            } else {
                match json.dict_get_str("objects_of_interest") {
                    Some(PyValue::List(items) | PyValue::Tuple(items)) => from_items(items),
                    _ => vec![],
                }
            }
        }
        _ => vec![],
    }
}

/// Python's `int(x)` for a box coordinate; `None` where it raises.
fn py_int(v: &PyValue) -> Option<i128> {
    let big = |f: f64| if f > 0.0 { i128::MAX } else { i128::MIN };
    match v {
        PyValue::Bool(b) => Some(*b as i128),
        PyValue::Int(PyInt::Small(i)) => Some(*i),
        PyValue::Int(PyInt::Big(f)) => Some(big(*f)),
        PyValue::Float(f) if f.is_finite() => {
            let t = f.trunc();
            Some(if t.abs() < 1.0e38 { t as i128 } else { big(t) })
        }
        PyValue::Str(s) => py_int_from_str(s).map(|i| match i {
            PyInt::Small(i) => i,
            PyInt::Big(f) => big(f),
        }),
        PyValue::Bytes(b) => {
            std::str::from_utf8(b)
                .ok()
                .and_then(py_int_from_str)
                .map(|i| match i {
                    PyInt::Small(i) => i,
                    PyInt::Big(f) => big(f),
                })
        }
        _ => None,
    }
}

/// A Python real number (int or float) for the box-vs-box arithmetic.
#[derive(Debug, Clone, Copy)]
enum Num {
    I(i128),
    F(f64),
}

impl Num {
    fn from_py(v: &PyValue) -> Option<Num> {
        match v {
            PyValue::Bool(b) => Some(Num::I(*b as i128)),
            PyValue::Int(PyInt::Small(i)) => Some(Num::I(*i)),
            // beyond i128: approximated by its float value; beyond f64, Python's arithmetic
            // would raise OverflowError, which the caller treats like any exception
            PyValue::Int(PyInt::Big(f)) if f.is_finite() => Some(Num::F(*f)),
            PyValue::Float(f) => Some(Num::F(*f)),
            _ => None,
        }
    }

    /// `float(self)`.
    fn f(self) -> Option<f64> {
        match self {
            Num::I(i) => Some(i as f64),
            Num::F(f) => Some(f),
        }
    }

    /// Exact Python comparison; `None` when unordered (NaN).
    fn cmp(self, o: Num) -> Option<Ordering> {
        match (self, o) {
            (Num::I(a), Num::I(b)) => Some(a.cmp(&b)),
            (Num::F(a), Num::F(b)) => a.partial_cmp(&b),
            (Num::I(a), Num::F(b)) => cmp_int_float(a, b),
            (Num::F(a), Num::I(b)) => cmp_int_float(b, a).map(Ordering::reverse),
        }
    }

    fn gt(self, o: Num) -> bool {
        self.cmp(o) == Some(Ordering::Greater)
    }

    fn lt(self, o: Num) -> bool {
        self.cmp(o) == Some(Ordering::Less)
    }

    fn ge(self, o: Num) -> bool {
        matches!(self.cmp(o), Some(Ordering::Greater | Ordering::Equal))
    }

    fn sub(self, o: Num) -> Option<Num> {
        match (self, o) {
            (Num::I(a), Num::I(b)) => Some(match a.checked_sub(b) {
                Some(v) => Num::I(v),
                None => Num::F(a as f64 - b as f64),
            }),
            _ => Some(Num::F(self.f()? - o.f()?)),
        }
    }

    fn add(self, o: Num) -> Option<Num> {
        match (self, o) {
            (Num::I(a), Num::I(b)) => Some(match a.checked_add(b) {
                Some(v) => Num::I(v),
                None => Num::F(a as f64 + b as f64),
            }),
            _ => Some(Num::F(self.f()? + o.f()?)),
        }
    }

    fn mul(self, o: Num) -> Option<Num> {
        match (self, o) {
            (Num::I(a), Num::I(b)) => Some(match a.checked_mul(b) {
                Some(v) => Num::I(v),
                None => Num::F(a as f64 * b as f64),
            }),
            _ => Some(Num::F(self.f()? * o.f()?)),
        }
    }

    /// True division (the divisor is known to be > 0).
    fn div(self, o: Num) -> Option<f64> {
        Some(self.f()? / o.f()?)
    }
}

/// Exact comparison of an integer with a float (Python semantics).
fn cmp_int_float(i: i128, f: f64) -> Option<Ordering> {
    if f.is_nan() {
        return None;
    }
    const TWO127: f64 = 1.7014118346046923e38;
    if f >= TWO127 {
        return Some(Ordering::Less);
    }
    if f < -TWO127 {
        return Some(Ordering::Greater);
    }
    let t = f.trunc();
    let ti = t as i128;
    match i.cmp(&ti) {
        Ordering::Equal => {
            let frac = f - t;
            Some(if frac > 0.0 {
                Ordering::Less
            } else if frac < 0.0 {
                Ordering::Greater
            } else {
                Ordering::Equal
            })
        }
        o => Some(o),
    }
}

/// Python's `max(a, b)` / `min(a, b)`: the first argument unless the second compares greater
/// / smaller.
fn py_max(a: Num, b: Num) -> Num {
    if b.gt(a) { b } else { a }
}

fn py_min(a: Num, b: Num) -> Num {
    if b.lt(a) { b } else { a }
}

/// The reference IoU's value and its Python type: `float` or a float32 0-dim tensor (the mask
/// branch), which turns the reference's `overall` into float32 arithmetic too.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RefIou {
    /// A Python float.
    Float(f64),
    /// A float32 tensor.
    F32(f32),
}

impl RefIou {
    /// The value as `f64`.
    pub fn value(self) -> f64 {
        match self {
            RefIou::Float(v) => v,
            RefIou::F32(v) => v as f64,
        }
    }
}

/// `calculate_bbox_iou` exactly as released. `Err(Raised)` where it raises (the caller's bare
/// `except` then leaves the IoU at 0): a box without `len()`, and in the box branch a
/// non-numeric coordinate, an out-of-range index, or a second box (`gt_bbox.tolist()` on a list).
pub fn reference_iou(
    pred: &[PyValue],
    mask: Option<&MaskIndex>,
    gt: Option<[f64; 4]>,
) -> Result<RefIou, Raised> {
    if pred.is_empty() {
        return Ok(RefIou::Float(0.0));
    }
    let wrapped;
    let boxes: &[PyValue] = if matches!(pred[0], PyValue::List(_)) {
        pred
    } else {
        wrapped = [PyValue::List(pred.to_vec())];
        &wrapped
    };
    let n = boxes.len();
    if let Some(m) = mask.filter(|m| m.foreground() > 0) {
        let mut total: Option<f32> = None;
        for b in boxes {
            let len = b.py_len().ok_or(Raised)?;
            if len < 4 {
                continue;
            }
            let mut c = [0i128; 4];
            let mut ok = true;
            for (k, slot) in c.iter_mut().enumerate() {
                match b.index(k).as_ref().and_then(py_int) {
                    Some(v) => *slot = v,
                    None => {
                        ok = false;
                        break;
                    }
                }
            }
            if !ok {
                continue;
            }
            let (inter, union) = m.box_counts(c);
            let iou = inter as f32 / union as f32;
            total = Some(total.unwrap_or(0.0) + iou);
        }
        return Ok(match total {
            Some(t) => RefIou::F32(t / n as f32),
            None => RefIou::Float(0.0 / n as f64),
        });
    }
    let Some(g) = gt else {
        return Ok(RefIou::Float(0.0));
    };
    let g = g.map(Num::F);
    let mut total = 0.0f64;
    let mut reached = 0;
    for b in boxes {
        let len = b.py_len().ok_or(Raised)?;
        if len < 4 {
            continue;
        }
        reached += 1;
        if reached >= 2 {
            return Err(Raised); // gt_bbox.tolist() on a list
        }
        let mut p = [Num::I(0); 4];
        for (k, slot) in p.iter_mut().enumerate() {
            *slot = b.index(k).as_ref().and_then(Num::from_py).ok_or(Raised)?;
        }
        total += box_iou_reference(p, g).ok_or(Raised)?;
    }
    Ok(RefIou::Float(total / n as f64))
}

/// One box-vs-box IoU with the reference's Python arithmetic; `None` on a Python exception.
fn box_iou_reference(p: [Num; 4], g: [Num; 4]) -> Option<f64> {
    let x1 = py_max(p[0], g[0]);
    let y1 = py_max(p[1], g[1]);
    let x2 = py_min(p[2], g[2]);
    let y2 = py_min(p[3], g[3]);
    if x1.ge(x2) || y1.ge(y2) {
        return Some(0.0);
    }
    let inter = x2.sub(x1)?.mul(y2.sub(y1)?)?;
    let pred_area = p[2].sub(p[0])?.mul(p[3].sub(p[1])?)?;
    let gt_area = g[2].sub(g[0])?.mul(g[3].sub(g[1])?)?;
    let union = pred_area.add(gt_area)?.sub(inter)?;
    if union.gt(Num::I(0)) {
        inter.div(union)
    } else {
        Some(0.0)
    }
}

/// How the fixed IoU reduces per-box IoUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IouReduce {
    /// Mean over every predicted box (the released code).
    #[default]
    Mean,
    /// Best box (the paper's `max_j IoU(b_j, S)`).
    Max,
}

/// A box value as four finite coordinates (numbers, or strings that `int()` accepts).
pub fn box_coords(b: &PyValue) -> Option<[f64; 4]> {
    match b {
        PyValue::List(v) | PyValue::Tuple(v) if v.len() == 4 => {
            let mut c = [0.0; 4];
            for (slot, x) in c.iter_mut().zip(v) {
                *slot = match x {
                    PyValue::Bool(b) => *b as i32 as f64,
                    PyValue::Int(i) => i.to_f64()?,
                    PyValue::Float(f) => *f,
                    PyValue::Str(_) => py_int(x)? as f64,
                    _ => return None,
                };
                if !slot.is_finite() {
                    return None;
                }
            }
            Some(c)
        }
        _ => None,
    }
}

/// The fixed IoU: every predicted box is scored on its own (malformed boxes score 0 instead of
/// zeroing the sample), box-vs-box works for any number of boxes, reduced by mean or max.
/// Mask geometry is the reference's (int truncation, clipping, inclusive pixels).
pub fn fixed_iou(
    pred: &[PyValue],
    mask: Option<&MaskIndex>,
    gt: Option<[f64; 4]>,
    reduce: IouReduce,
) -> f64 {
    if pred.is_empty() {
        return 0.0;
    }
    let mask = mask.filter(|m| m.foreground() > 0);
    let gt = gt.filter(|g| g.iter().all(|v| v.is_finite()));
    if mask.is_none() && gt.is_none() {
        return 0.0;
    }
    let per_box = pred.iter().map(|b| {
        let Some(c) = box_coords(b) else {
            return 0.0;
        };
        if let Some(m) = mask {
            let t = |v: f64| {
                if v.abs() < 1.0e38 {
                    v.trunc() as i128
                } else if v > 0.0 {
                    i128::MAX
                } else {
                    i128::MIN
                }
            };
            let (inter, union) = m.box_counts(c.map(t));
            return if union > 0 {
                inter as f64 / union as f64
            } else {
                0.0
            };
        }
        let g = gt.unwrap_or([0.0; 4]);
        box_iou(c, g)
    });
    let (sum, best) = per_box.fold((0.0f64, 0.0f64), |(s, m), v| (s + v, m.max(v)));
    let v = match reduce {
        IouReduce::Mean => sum / pred.len() as f64,
        IouReduce::Max => best,
    };
    if v.is_finite() {
        v.clamp(0.0, 1.0)
    } else {
        0.0
    }
}

/// Continuous IoU of two boxes; corners are normalised so reversed boxes work.
pub fn box_iou(a: [f64; 4], b: [f64; 4]) -> f64 {
    let norm = |c: [f64; 4]| {
        [
            c[0].min(c[2]),
            c[1].min(c[3]),
            c[0].max(c[2]),
            c[1].max(c[3]),
        ]
    };
    let (a, b) = (norm(a), norm(b));
    let iw = a[2].min(b[2]) - a[0].max(b[0]);
    let ih = a[3].min(b[3]) - a[1].max(b[1]);
    if !(iw > 0.0 && ih > 0.0) {
        return 0.0;
    }
    let inter = iw * ih;
    let union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
    let v = inter / union;
    if v.is_finite() {
        v.clamp(0.0, 1.0)
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pyvalue::json_loads;

    fn golden_mask() -> MaskIndex {
        let mut d = vec![0u8; 40 * 40];
        for y in 10..30 {
            for x in 10..30 {
                d[y * 40 + x] = 1;
            }
        }
        MaskIndex::new(&SegMask::new(40, 40, d).unwrap())
    }

    fn boxes(js: &str) -> Vec<PyValue> {
        match json_loads(js).unwrap() {
            PyValue::List(v) => v,
            _ => unreachable!(),
        }
    }

    #[test]
    fn summed_area_table_counts_inclusive_boxes() {
        let m = golden_mask();
        assert_eq!(m.foreground(), 400);
        assert_eq!(m.box_counts([10, 10, 29, 29]), (400, 400));
        assert_eq!(m.box_counts([0, 0, 19, 19]), (100, 700));
        assert_eq!(m.box_counts([29, 29, 10, 10]), (400, 400));
        assert_eq!(m.box_counts([5, 5, 5, 50]), (0, 400));
        assert_eq!(m.box_counts([-100, -100, 1000, 1000]), (400, 1600));
    }

    #[test]
    fn golden_mask_branch_mean_counts_skipped_boxes() {
        let m = golden_mask();
        let p = boxes("[[0,0,19,19],[10,10,29,29],[1,2]]");
        let v = reference_iou(&p, Some(&m), None).unwrap().value();
        assert!((v - 0.380952).abs() < 1e-6, "{v}");
    }

    #[test]
    fn golden_box_branch_and_its_tolist_bug() {
        let g = Some([0.0, 0.0, 10.0, 10.0]);
        let one = |js: &str| reference_iou(&boxes(js), None, g);
        assert_eq!(one("[[0,0,10,10]]"), Ok(RefIou::Float(1.0)));
        assert!((one("[[5,5,15,15]]").unwrap().value() - 0.142857).abs() < 1e-6);
        assert_eq!(one("[[0,0,10,10],[5,5,15,15]]"), Err(Raised));
        let f = fixed_iou(
            &boxes("[[0,0,10,10],[5,5,15,15]]"),
            None,
            g,
            IouReduce::Mean,
        );
        assert!((f - (1.0 + 25.0 / 175.0) / 2.0).abs() < 1e-15);
        let f = fixed_iou(&boxes("[[0,0,10,10],[5,5,15,15]]"), None, g, IouReduce::Max);
        assert_eq!(f, 1.0);
    }

    #[test]
    fn a_scalar_box_zeroes_the_reference_but_not_the_fixed_iou() {
        let m = golden_mask();
        // len(5) raises TypeError in the reference: the whole IoU becomes 0
        let p = boxes("[[10,10,29,29], 5]");
        assert_eq!(reference_iou(&p, Some(&m), None), Err(Raised));
        assert_eq!(fixed_iou(&p, Some(&m), None, IouReduce::Mean), 0.5);
        assert_eq!(fixed_iou(&p, Some(&m), None, IouReduce::Max), 1.0);
        // int("10") works in the reference's mask branch; int(NaN) skips the box
        let p = boxes("[[\"10\", \" 10 \", 29.9, true], [NaN, 0, 1, 1]]");
        let v = reference_iou(&p, Some(&m), None).unwrap();
        // box x 10..=29, y 1..=10 (true is 1, corners swapped): 20 of 580 pixels
        let want = (20.0f32 / 580.0) / 2.0;
        assert_eq!(v, RefIou::F32(want));
        // four scalar boxes are wrapped into one box by the reference
        let p = boxes("[10, 10, 29, 29]");
        assert_eq!(reference_iou(&p, Some(&m), None), Ok(RefIou::F32(1.0)));
    }

    #[test]
    fn fences_follow_the_reference_regex() {
        assert_eq!(
            fenced_blocks("```json\n[1]\n``` x ```[2]```"),
            vec!["[1]\n", "[2]"]
        );
        assert_eq!(fenced_blocks("`````"), Vec::<&str>::new());
        assert_eq!(fenced_blocks("``````"), vec![""]);
    }
}
