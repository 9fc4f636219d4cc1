//! Cleaning an image cache over 10,000 volumes (issue 15): the agent reads each volume
//! file's header for its backing file and deletes the cached images none names. The store
//! has 100 cached images and 10,000 root volumes backed by the first 50 of them (real qcow2
//! files: one per cache made by `qemu-img`, the rest copies of it); each round deletes the
//! other 50, which are put back before the next.
//!
//! `cargo bench -p strato-agent --bench image_cache`

use std::process::Command;
use std::time::{Duration, Instant};

use strato_agent::volumes::clean_image_cache;

const CACHES: usize = 100;
const USED: usize = 50;
const VOLUMES: usize = 10_000;
const ROUNDS: usize = 5;

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().expect("run qemu-img");
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let cache = dir.path().join("imagecache");
    let volumes = dir.path().join("rootvolumes");
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::create_dir_all(&volumes).unwrap();
    let image = dir.path().join("image.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", image.to_str().unwrap(), "64M"]);
    let cache_file = |i: usize| cache.join(format!("{i:04}.qcow2"));
    let started = Instant::now();
    for i in 0..USED {
        std::fs::copy(&image, cache_file(i)).unwrap();
        let first = volumes.join(format!("{i:04}-0000.qcow2"));
        let backing = cache_file(i).display().to_string();
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            &backing,
            first.to_str().unwrap(),
        ]);
        for n in 1..VOLUMES / USED {
            std::fs::copy(&first, volumes.join(format!("{i:04}-{n:04}.qcow2"))).unwrap();
        }
    }
    println!("{VOLUMES} volumes on {USED} cached images made in {:.1?}", started.elapsed());
    let dirs = [volumes.display().to_string()];
    let mut times = Vec::new();
    for round in 1..=ROUNDS {
        for i in USED..CACHES {
            std::fs::copy(&image, cache_file(i)).unwrap();
        }
        let started = Instant::now();
        let cleaned = clean_image_cache(&cache.display().to_string(), &dirs, Duration::ZERO)
            .await
            .expect("the cleaning");
        let took = started.elapsed();
        assert_eq!(cleaned.deleted.len(), CACHES - USED, "every unused cache goes");
        assert_eq!(cleaned.kept, USED as u64, "every used cache stays");
        assert_eq!(cleaned.volumes_read, VOLUMES as u64);
        println!(
            "round {round}: {} volumes read, {} caches deleted, {} kept, in {:.1} ms",
            cleaned.volumes_read,
            cleaned.deleted.len(),
            cleaned.kept,
            took.as_secs_f64() * 1000.0
        );
        times.push(took);
    }
    times.sort();
    println!(
        "image cache cleaning over {VOLUMES} volumes: median {:.1} ms, min {:.1} ms, max {:.1} ms",
        times[ROUNDS / 2].as_secs_f64() * 1000.0,
        times[0].as_secs_f64() * 1000.0,
        times[ROUNDS - 1].as_secs_f64() * 1000.0
    );
}
