//! The processor settings a model was trained with, travelling with it: `qoq_processor.json`
//! beside `config.json` in an exported model folder (and in every trainer checkpoint). `qoq
//! infer`, `qoq serve` and `qoq eval --model` read it, so a model is served with the
//! dataset-side resize, the format prompt, the prompt length and the ECG convention it was
//! trained with, not with the defaults; a folder without the file (a stock checkpoint) gets
//! [`ProcessorOptions::default`].
//!
//! The file holds `{"format": 1, "processor": {ProcessorOptions}, "video_frames": N,
//! "windowing": {...}}`: the options with the two image-loading settings that a run file keeps
//! in its manifest section (`[data.manifest] video_frames`) rather than in the options.

use crate::error::{Error, Result};
use crate::processor::ProcessorOptions;
use qoq_data::dicom::Windowing;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The file name inside a model folder.
pub const SETTINGS_FILE: &str = "qoq_processor.json";

const FORMAT: u32 = 1;

/// The contents of `qoq_processor.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessorSettings {
    /// File format version (1).
    pub format: u32,
    /// The processor options of the run.
    pub processor: ProcessorOptions,
    /// Frames sampled from each volume.
    pub video_frames: usize,
    /// DICOM windowing.
    pub windowing: Windowing,
}

impl ProcessorSettings {
    /// The settings of `opts` (its image-loading options included).
    pub fn from_options(opts: &ProcessorOptions) -> Self {
        Self {
            format: FORMAT,
            processor: opts.clone(),
            video_frames: opts.image_load.video_frames,
            windowing: opts.image_load.windowing,
        }
    }

    /// Back to processor options.
    pub fn into_options(self) -> ProcessorOptions {
        let mut o = self.processor;
        o.image_load.video_frames = self.video_frames;
        o.image_load.windowing = self.windowing;
        o
    }

    /// Write `dir/qoq_processor.json`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(SETTINGS_FILE);
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::File {
            path: path.clone(),
            message: e.to_string(),
        })? + "\n";
        std::fs::write(&path, text).map_err(|e| Error::File {
            path,
            message: e.to_string(),
        })
    }

    /// Read `dir/qoq_processor.json`; `None` when the folder has none.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(SETTINGS_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let file_err = |message: String| Error::File {
            path: path.clone(),
            message,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| file_err(e.to_string()))?;
        let s: Self = serde_json::from_str(&text).map_err(|e| file_err(e.to_string()))?;
        if s.format != FORMAT {
            return Err(file_err(format!(
                "format {} is not supported (this build reads format {FORMAT})",
                s.format
            )));
        }
        if s.video_frames == 0 {
            return Err(file_err("video_frames must be at least 1".into()));
        }
        Ok(Some(s))
    }
}

impl ProcessorOptions {
    /// The options a model folder was trained with (its `qoq_processor.json`), or the defaults
    /// when it has none; the flag says which.
    pub fn for_model_dir(dir: &Path) -> Result<(Self, bool)> {
        Ok(match ProcessorSettings::read(dir)? {
            Some(s) => (s.into_options(), true),
            None => (Self::default(), false),
        })
    }

    /// Write these options into a model folder as `qoq_processor.json`.
    pub fn write_to_model_dir(&self, dir: &Path) -> Result<()> {
        ProcessorSettings::from_options(self).write(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_round_trip_with_the_image_loading_options() {
        let dir = tempfile::tempdir().unwrap();
        assert!(ProcessorSettings::read(dir.path()).unwrap().is_none());
        let (d, found) = ProcessorOptions::for_model_dir(dir.path()).unwrap();
        assert!(!found);
        assert_eq!(
            d.dataset_max_pixels,
            ProcessorOptions::default().dataset_max_pixels
        );
        let mut o = ProcessorOptions {
            format_prompt: None,
            dataset_min_pixels: 1024,
            dataset_max_pixels: 4096,
            max_prompt_length: 77,
            ecg_zscore: true,
            ..ProcessorOptions::default()
        };
        o.image_load.video_frames = 4;
        o.image_load.windowing = Windowing::MinMax;
        o.write_to_model_dir(dir.path()).unwrap();
        let (back, found) = ProcessorOptions::for_model_dir(dir.path()).unwrap();
        assert!(found);
        assert_eq!(back.format_prompt, None);
        assert_eq!(
            (
                back.dataset_min_pixels,
                back.dataset_max_pixels,
                back.max_prompt_length
            ),
            (1024, 4096, 77)
        );
        assert!(back.ecg_zscore);
        assert_eq!(back.image_load, o.image_load);
    }

    #[test]
    fn a_bad_settings_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SETTINGS_FILE);
        std::fs::write(&path, "{\"format\": 1, \"processor\": {}, \"video_frames\": 2, \"windowing\": {\"mode\": \"from_file\"}, \"extra\": 1}").unwrap();
        let e = ProcessorSettings::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains(SETTINGS_FILE) && e.contains("extra"), "{e}");
        std::fs::write(&path, "{\"format\": 9, \"processor\": {}, \"video_frames\": 2, \"windowing\": {\"mode\": \"from_file\"}}").unwrap();
        let e = ProcessorSettings::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("format 9"), "{e}");
    }
}
