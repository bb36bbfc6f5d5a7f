//! What a run leaves on disk: a resumed run continues bit for bit, damaged checkpoints are
//! errors, the log and plots are written.

use moekit_grpo::run::{load_checkpoint, read_series, save_checkpoint, write_plots, JsonlLog};
use moekit_grpo::task::TaskKind;
use moekit_grpo::trainer::Trainer;
mod common;
use common::tiny;

fn bits(t: &Trainer) -> Vec<u32> {
    t.model.params.data.iter().flatten().chain(t.model.router_bias.iter().flatten()).map(|x| x.to_bits()).collect()
}

#[test]
fn resume_is_bit_identical_and_files_are_written() {
    let dir = std::env::temp_dir().join(format!("moekit-grpo-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ckpt = dir.join("checkpoint.safetensors");
    let mut straight = Trainer::new(tiny(TaskKind::Reverse { digits: 2 }, 6)).unwrap();
    let mut log = JsonlLog::open(&dir.join("metrics.jsonl")).unwrap();
    let mut history = Vec::new();
    for step in 0..6 {
        let m = straight.train_step().unwrap();
        log.write(&m).unwrap();
        history.push(m);
        if step == 2 {
            save_checkpoint(&straight, &ckpt).unwrap();
        }
    }
    let mut resumed = load_checkpoint(&ckpt).unwrap();
    assert_eq!(resumed.step, 3);
    for _ in 0..3 {
        resumed.train_step().unwrap();
    }
    assert_eq!(bits(&straight), bits(&resumed), "resumed run differs");
    assert_eq!(straight.rng.state(), resumed.rng.state());
    // The log has one line per step with TRL's names, and the plots render.
    let rewards = read_series(&dir.join("metrics.jsonl"), "rewards/position/mean").unwrap();
    assert_eq!(rewards.len(), 6);
    write_plots(&dir, &history).unwrap();
    for f in ["plot.png", "plot.svg"] {
        assert!(std::fs::metadata(dir.join(f)).unwrap().len() > 1000, "{f}");
    }
    // Damaged or foreign checkpoints are errors naming the file.
    let good = std::fs::read(&ckpt).unwrap();
    let bad = dir.join("bad.safetensors");
    std::fs::write(&bad, &good[..good.len() / 3]).unwrap();
    assert!(load_checkpoint(&bad).err().unwrap().to_string().contains("bad.safetensors"));
    let plain = dir.join("model-only.safetensors");
    moekit_model::checkpoint::save(&plain, &straight.model, None, None, &Default::default()).unwrap();
    assert!(load_checkpoint(&plain).err().unwrap().to_string().contains("not a moekit-grpo checkpoint"));
    assert!(load_checkpoint(&dir.join("missing.safetensors")).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}
