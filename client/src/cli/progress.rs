//! The progress display of `coffer snapshot create`: it renders the library's
//! [`Progress`] counters; the library itself never prints.

use std::sync::Arc;

use coffer_client::Progress;

/// Renders backup progress until aborted: a bar on a terminal (files, bytes, uploaded, speed,
/// ETA), a plain line every 10 seconds otherwise.
pub async fn show_progress(p: Arc<Progress>) {
    use std::io::IsTerminal;
    use std::sync::atomic::Ordering::Relaxed;
    let tty = std::io::stderr().is_terminal();
    let bar = tty.then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let _finish = FinishOnDrop(bar.clone());
    let start = std::time::Instant::now();
    let mut last_line = start;
    loop {
        let (ft, fd) = (p.files_total.load(Relaxed), p.files_done.load(Relaxed));
        let (bt, bd, up) = (
            p.bytes_total.load(Relaxed),
            p.bytes_done.load(Relaxed),
            p.bytes_uploaded.load(Relaxed),
        );
        if let Some(b) = &bar {
            b.set_length(bt);
            b.set_position(bd);
            b.set_message(format!(
                "{fd}/{ft} files, {} uploaded",
                indicatif::HumanBytes(up)
            ));
        } else if last_line.elapsed() >= std::time::Duration::from_secs(10) {
            eprintln!(
                "progress: {fd}/{ft} files, {bd}/{bt} bytes, {up} bytes uploaded, {:.0}s",
                start.elapsed().as_secs_f64()
            );
            last_line = std::time::Instant::now();
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

struct FinishOnDrop(Option<indicatif::ProgressBar>);

impl Drop for FinishOnDrop {
    fn drop(&mut self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}
