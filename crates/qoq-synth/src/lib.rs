//! qoq-synth: a synthetic, imbalanced, multi-domain clinical world for laptops and CI.
//!
//! No real clinical dataset may be redistributed or downloaded here, so `qoq demo` and the tests
//! generate one: nine domains named as the paper's (ECG; chest X-ray, mammography, dermoscopy,
//! fundus, pathology as 2-D; CT and MRI as 3-D volumes; ultrasound), each with datasets of 2 to 4
//! classes decided by visible structure, masks and boxes for every finding, ECGs from the ECGSYN
//! model, CLIMB-style questions, the paper's kind of domain imbalance (about 100:1 by default)
//! and class imbalance inside datasets. Everything is written in the training schema (spec §2.1),
//! so every other command reads it unchanged, and is byte-reproducible from the seed.

pub mod canvas;
pub mod ecgsyn;
pub mod error;
pub mod render;
pub mod world;

pub use error::{Error, Result};
pub use world::{DatasetSpec, WorldConfig, WorldSummary, catalog, generate};
