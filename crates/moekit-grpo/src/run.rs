//! What a run leaves on disk: checkpoints that resume bit for bit, the JSONL log of every
//! metric, and the plots. Every file is written atomically (a temporary file, then a rename),
//! so an interrupted or failed write never destroys the previous one.

use crate::trainer::{StepMetrics, TrainConfig, Trainer};
use crate::{Error, Result};
use moekit_model::checkpoint;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

const CONFIG_KEY: &str = "grpo.config";
const STEP_KEY: &str = "grpo.step";

fn io(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::InvalidInput(format!("{}: {e}", path.display()))
}

/// Saves the trainer (model, optimizer, RNG, step, config) to `path` atomically.
pub fn save_checkpoint(trainer: &Trainer, path: &Path) -> Result<()> {
    let mut extra = BTreeMap::new();
    extra.insert(CONFIG_KEY.to_string(), toml::to_string(&trainer.cfg).map_err(|e| io(path, e))?);
    extra.insert(STEP_KEY.to_string(), trainer.step.to_string());
    checkpoint::save(path, &trainer.model, Some(&trainer.opt), Some(&trainer.rng), &extra)
        .map_err(|e| Error::InvalidInput(e.to_string()))
}

/// Loads a trainer saved by [`save_checkpoint`]; it continues exactly where it stopped.
pub fn load_checkpoint(path: &Path) -> Result<Trainer> {
    let ck = checkpoint::load(path).map_err(|e| Error::InvalidInput(e.to_string()))?;
    let missing = |what: &str| io(path, format!("not a moekit-grpo checkpoint (no {what})"));
    let cfg: TrainConfig = toml::from_str(ck.extra.get(CONFIG_KEY).ok_or_else(|| missing("trainer config"))?)
        .map_err(|e| io(path, format!("trainer config: {e}")))?;
    let step = ck.extra.get(STEP_KEY).and_then(|s| s.parse().ok()).ok_or_else(|| missing("step"))?;
    let opt = ck.optimizer.ok_or_else(|| missing("optimizer state"))?;
    let rng = ck.rng.ok_or_else(|| missing("RNG state"))?;
    Trainer::from_parts(cfg, ck.model, opt, rng, step)
}

/// Appends one JSON object per line (flushed each call).
pub struct JsonlLog {
    file: std::fs::File,
}

impl JsonlLog {
    /// Opens (creating or appending to) `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| io(path, e))?;
        Ok(JsonlLog { file })
    }

    /// Writes `m` flattened: `rewards/<name>/mean|std` for each reward function.
    pub fn write(&mut self, m: &StepMetrics) -> Result<()> {
        let mut v = serde_json::to_value(m).map_err(|e| Error::InvalidInput(e.to_string()))?;
        if let Some(obj) = v.as_object_mut() {
            obj.remove("rewards");
            for (name, mean, std) in &m.rewards {
                obj.insert(format!("rewards/{name}/mean"), (*mean).into());
                obj.insert(format!("rewards/{name}/std"), (*std).into());
            }
        }
        writeln!(self.file, "{v}").and_then(|_| self.file.flush()).map_err(|e| Error::InvalidInput(format!("log: {e}")))
    }
}

/// Reads back a JSONL log's values of `key` per line (missing: skipped).
pub fn read_series(path: &Path, key: &str) -> Result<Vec<(f64, f64)>> {
    let text = std::fs::read_to_string(path).map_err(|e| io(path, e))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v.get("step")?.as_f64()?, v.get(key)?.as_f64()?)))
        .collect())
}

/// A panel of the plot: its title and named `(step, value)` lines.
type Panel<'a> = (&'a str, Vec<(&'a str, Vec<(f64, f64)>)>);

/// Writes `plot.png` and `plot.svg` into `dir`: reward (per-position and exact), entropy, KL
/// and expert load (max / mean) against the step, one panel each.
pub fn write_plots(dir: &Path, history: &[StepMetrics]) -> Result<()> {
    use plotters::prelude::*;
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    let series = |f: &dyn Fn(&StepMetrics) -> f64| -> Vec<(f64, f64)> {
        history.iter().map(|m| (m.step as f64, f(m))).collect()
    };
    let reward_fn =
        |name: &'static str| move |m: &StepMetrics| m.rewards.iter().find(|r| r.0 == name).map_or(0.0, |r| r.1);
    let panels: Vec<Panel<'_>> = vec![
        ("reward", vec![("reward", series(&|m| m.reward)), ("exact", series(&reward_fn("exact")))]),
        ("entropy", vec![("entropy", series(&|m| m.entropy))]),
        ("kl", vec![("kl", series(&|m| m.kl))]),
        ("expert load (max / mean)", vec![("load", series(&|m| m.expert_load_max_over_mean))]),
    ];
    fn draw<DB: DrawingBackend>(
        root: DrawingArea<DB, plotters::coord::Shift>,
        panels: &[Panel<'_>],
    ) -> std::result::Result<(), String>
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let areas = root.split_evenly((2, 2));
        for (area, (title, lines)) in areas.iter().zip(panels) {
            let xmax = lines.iter().flat_map(|l| l.1.iter().map(|p| p.0)).fold(1.0, f64::max);
            let (mut lo, mut hi) = lines
                .iter()
                .flat_map(|l| l.1.iter().map(|p| p.1))
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| (a.min(y), b.max(y)));
            if !lo.is_finite() {
                (lo, hi) = (0.0, 1.0);
            }
            if hi - lo < 1e-9 {
                hi = lo + 1.0;
            }
            let mut chart = ChartBuilder::on(area)
                .caption(*title, ("sans-serif", 18))
                .margin(8)
                .x_label_area_size(28)
                .y_label_area_size(44)
                .build_cartesian_2d(0.0..xmax, lo..hi)
                .map_err(|e| e.to_string())?;
            chart.configure_mesh().x_desc("step").label_style(("sans-serif", 12)).draw().map_err(|e| e.to_string())?;
            for (i, (name, pts)) in lines.iter().enumerate() {
                let color = Palette99::pick(i).to_rgba();
                chart
                    .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                    .map_err(|e| e.to_string())?
                    .label(*name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
            }
            if lines.len() > 1 {
                chart
                    .configure_series_labels()
                    .label_font(("sans-serif", 12))
                    .background_style(WHITE.mix(0.8))
                    .draw()
                    .map_err(|e| e.to_string())?;
            }
        }
        root.present().map_err(|e| e.to_string())
    }
    for (ext, svg) in [("png", false), ("svg", true)] {
        let final_path = dir.join(format!("plot.{ext}"));
        // The bitmap backend picks the encoder from the extension: keep it last.
        let tmp = dir.join(format!(".plot.tmp-{}.{ext}", std::process::id()));
        let result = if svg {
            draw(SVGBackend::new(&tmp, (1000, 700)).into_drawing_area(), &panels)
        } else {
            draw(BitMapBackend::new(&tmp, (1000, 700)).into_drawing_area(), &panels)
        };
        // Image files are written by the backends: move into place only when complete.
        match result.and_then(|_| std::fs::rename(&tmp, &final_path).map_err(|e| e.to_string())) {
            Ok(()) => {}
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(io(&final_path, e));
            }
        }
    }
    Ok(())
}
