//! The paper's auxiliary rewards (QoQ-Med App. B.3; spec §8.7 end, §14 item 7), which the
//! released code does not implement:
//!
//! * [`box_per_label_score`], the binary format reward: 1 when every predicted label has a
//!   bounding box, else 0;
//! * [`coherence_score`], the visual-coherence reward across views,
//!   `r_coh = 1/|V| Σ_v IoU(b_v, T(b_v'))`.
//!
//! Definitions (the paper gives the formulas only; these are our readings, pinned by tests):
//!
//! * **Predicted labels** are the condition set of the last `\boxed{}` answer, parsed exactly as
//!   the accuracy reward parses it (spec §8.1-8.2). No answer (no `\boxed{}`, or `\boxed{None}`)
//!   means no predicted label, and the format reward is 0: an empty prediction earns nothing.
//! * **A label has a bounding box** when the JSON the IoU reward reads (the first fenced block
//!   that parses, spec §8.6) holds an item `{"bbox_2d": [4 finite numbers], "label": L}` whose
//!   stripped `L` equals that label (case-sensitive, as the F1 match). The paper names no
//!   exception, so labels without a location ("No Finding") need a box too.
//! * **Views and T.** `T` is the **identity** and the views are the **frames of one volume**: a
//!   row whose only visual input is one volume (`videos = [one path]`, no `images`) gives the
//!   model `|V| = video_frames` frames, every one resized identically, so a box drawn in one
//!   frame's pixels is in the same coordinates in every other frame (slices of one scan share the
//!   in-plane grid). Views of one study (e.g. a CC and an MLO mammogram, a frontal and a lateral
//!   chest X-ray) are different projections; nothing in the data registers them, and the
//!   identity between them would reward boxes at the same pixels of unrelated anatomy, so such
//!   rows (and rows with one view) get no coherence reward (0, the same for every rollout of a
//!   prompt, so group-relative advantages are unchanged).
//! * **Which box belongs to which view**: the model lists one box per frame in frame order, so
//!   `b_v` is the v-th valid box of the list; `v'` is the next frame, cyclically
//!   (`v' = (v + 1) mod |V|`). A missing box scores IoU 0 for its terms; boxes beyond `|V|`
//!   are ignored. With two frames `r_coh = IoU(b_0, b_1)`.
//!
//! Both are total: any text gives a value in [0, 1].

use crate::iou::{box_coords, box_iou};
use crate::pyvalue::PyValue;
use crate::text::{extract_boxed_str, parse_condition_set, py_strip};
use qoq_core::ClinicalSample;

/// Which format reward the QoQ reward uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FormatReward {
    /// The released code's graded JSON-box score in [0, 1] (spec §8.4).
    #[default]
    GradedJson,
    /// The paper's binary reward: 1 when every predicted label has a bounding box, else 0.
    BoxPerLabel,
}

/// The box items of the parsed JSON, in order: every dict item of a list, the dict itself, or
/// the items of its `objects_of_interest` (the traversal of [`crate::iou::collect_bboxes`]),
/// as (stripped label when it is a string, box when `bbox_2d` holds 4 finite numbers).
fn box_items(json: &PyValue) -> Vec<(Option<String>, Option<[f64; 4]>)> {
    let item = |it: &PyValue| match it {
        PyValue::Dict(_) => {
            let label = match it.dict_get_str("label") {
                Some(PyValue::Str(s)) => Some(py_strip(s).to_string()),
                _ => None,
            };
            let coords = it.dict_get_str("bbox_2d").and_then(box_coords);
            Some((label, coords))
        }
        _ => None,
    };
    match json {
        PyValue::List(items) => items.iter().filter_map(item).collect(),
        PyValue::Dict(_) if json.dict_has("bbox_2d") => item(json).into_iter().collect(),
        PyValue::Dict(_) => match json.dict_get_str("objects_of_interest") {
            Some(PyValue::List(items) | PyValue::Tuple(items)) => {
                items.iter().filter_map(item).collect()
            }
            _ => Vec::new(),
        },
        _ => Vec::new(),
    }
}

/// The binary format reward: 1.0 when the response has a `\boxed{}` answer and every label of
/// it has a box in `json` (the JSON the IoU reward parsed from the response), else 0.0.
pub fn box_per_label_score(response: &str, json: Option<&PyValue>) -> f64 {
    let labels = match extract_boxed_str(response) {
        None | Some("None") => return 0.0,
        Some(ans) => parse_condition_set(ans),
    };
    let Some(json) = json else {
        return 0.0;
    };
    let boxed: Vec<String> = box_items(json)
        .into_iter()
        .filter_map(|(label, coords)| coords.and(label))
        .collect();
    let all = !labels.is_empty() && labels.iter().all(|l| boxed.iter().any(|b| b == l));
    if all { 1.0 } else { 0.0 }
}

/// The number of views the coherence reward compares for a sample: the frames of its one volume
/// (the `<image>` placeholders of its normalised question) when a single volume is its only
/// visual input; 0 otherwise (no transform between the views is known; see the module docs).
pub fn coherence_views(sample: &ClinicalSample) -> usize {
    if sample.images.is_empty() && sample.videos.len() == 1 {
        sample.problem.matches("<image>").count()
    } else {
        0
    }
}

/// `r_coh = 1/|V| Σ_v IoU(b_v, b_{(v+1) mod |V|})` with `T` the identity, `b_v` the v-th valid
/// box of `json`; 0 when `views < 2` or there is no JSON.
pub fn coherence_score(json: Option<&PyValue>, views: usize) -> f64 {
    if views < 2 {
        return 0.0;
    }
    let Some(json) = json else {
        return 0.0;
    };
    let boxes: Vec<[f64; 4]> = box_items(json)
        .into_iter()
        .filter_map(|(_, c)| c)
        .take(views)
        .collect();
    let sum: f64 = (0..views)
        .map(|v| match (boxes.get(v), boxes.get((v + 1) % views)) {
            (Some(a), Some(b)) => box_iou(*a, *b),
            _ => 0.0,
        })
        .sum();
    let r = sum / views as f64;
    if r.is_finite() {
        r.clamp(0.0, 1.0)
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pyvalue::json_loads;

    fn js(s: &str) -> PyValue {
        json_loads(s).unwrap()
    }

    #[test]
    fn every_predicted_label_needs_a_labelled_valid_box() {
        let two = js(r#"[{"bbox_2d": [1, 2, 3, 4], "label": "Edema"},
                        {"bbox_2d": [5, 6, 7, 8], "label": " Nodule "}]"#);
        assert_eq!(
            box_per_label_score(r"\boxed{Edema, Nodule}", Some(&two)),
            1.0
        );
        assert_eq!(box_per_label_score(r"\boxed{Edema}", Some(&two)), 1.0);
        // a label without its box, an unparsed answer, no JSON, a case mismatch
        assert_eq!(box_per_label_score(r"\boxed{Edema, Mass}", Some(&two)), 0.0);
        assert_eq!(box_per_label_score("Edema", Some(&two)), 0.0);
        assert_eq!(box_per_label_score(r"\boxed{None}", Some(&two)), 0.0);
        assert_eq!(box_per_label_score(r"\boxed{Edema}", None), 0.0);
        assert_eq!(box_per_label_score(r"\boxed{edema}", Some(&two)), 0.0);
        // a box with 3 coordinates or a non-numeric one is no box
        let bad = js(
            r#"[{"bbox_2d": [1, 2, 3], "label": "Edema"}, {"bbox_2d": [1, "x", 3, 4], "label": "Nodule"}]"#,
        );
        assert_eq!(box_per_label_score(r"\boxed{Edema}", Some(&bad)), 0.0);
        assert_eq!(box_per_label_score(r"\boxed{Nodule}", Some(&bad)), 0.0);
        // a single dict and objects_of_interest are read like the IoU reward reads them
        let one = js(r#"{"bbox_2d": [1, 2, 3, 4], "label": "Edema"}"#);
        assert_eq!(box_per_label_score(r"\boxed{Edema}", Some(&one)), 1.0);
        let ooi = js(r#"{"objects_of_interest": [{"bbox_2d": [1, 2, 3, 4], "label": "Edema"}]}"#);
        assert_eq!(box_per_label_score(r"\boxed{Edema}", Some(&ooi)), 1.0);
    }

    #[test]
    fn coherence_is_the_mean_iou_of_each_frame_box_with_the_next() {
        // [0,0,10,10] vs [5,5,15,15]: 25 / 175
        let j = js(
            r#"[{"bbox_2d": [0, 0, 10, 10], "label": "a"}, {"bbox_2d": [5, 5, 15, 15], "label": "a"}]"#,
        );
        let iou = 25.0 / 175.0;
        assert!((coherence_score(Some(&j), 2) - iou).abs() < 1e-15);
        // 4 frames, 2 boxes: terms (0,1) and (1,2)->missing, (2,3), (3,0) missing -> IoU / 4
        assert!((coherence_score(Some(&j), 4) - iou / 4.0).abs() < 1e-15);
        // identical boxes in every frame
        let same = js(
            r#"[{"bbox_2d": [1, 1, 9, 9]}, {"bbox_2d": [1, 1, 9, 9]}, {"bbox_2d": [1, 1, 9, 9]}]"#,
        );
        assert_eq!(coherence_score(Some(&same), 3), 1.0);
        // one view or no JSON: no coherence reward
        assert_eq!(coherence_score(Some(&same), 1), 0.0);
        assert_eq!(coherence_score(None, 2), 0.0);
        // invalid boxes are skipped when counting frames
        let skip = js(
            r#"[{"bbox_2d": [1, 1]}, {"bbox_2d": [0, 0, 10, 10]}, {"bbox_2d": [0, 0, 10, 10]}]"#,
        );
        assert_eq!(coherence_score(Some(&skip), 2), 1.0);
    }
}
