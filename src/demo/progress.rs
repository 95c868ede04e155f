//! The demo's progress display: one line per job (a bar of units done, the state, where its units
//! are), redrawn in place when the output is a terminal, and printed as plain lines, only when a
//! job's line changes, when it is not (a pipe, a file, a CI log). Notes (what just happened) are
//! printed above the bars.
//!
//! The lines are computed from the API's `JobView` by pure functions ([`JobLine::of`],
//! [`JobLine::render`]); [`Progress`] only decides what to write and where.

use gantry_coordinator::api::types::JobView;
use std::collections::BTreeMap;
use std::io::Write;
use std::time::Instant;

const BAR_CELLS: usize = 12;
/// A line redrawn in place must not wrap (the redraw counts lines): cut to what an 80-column
/// terminal shows.
const IN_PLACE_LINE_CHARS_MAX: usize = 79;

/// What one job's progress line shows.
#[derive(Debug, Clone, PartialEq)]
pub struct JobLine {
    pub name: String,
    pub kind: String,
    pub state: String,
    /// Units done: succeeded workers or shards, healthy replicas.
    pub done: u32,
    pub total: u32,
    /// Agent names with how many of the job's units are placed there now (pending, running or
    /// healthy), in name order.
    pub active: Vec<(String, usize)>,
    pub n_lost: usize,
}

impl JobLine {
    /// The line for `job`; `agent_names` maps agent ids to the names people read.
    pub fn of(job: &JobView, agent_names: &BTreeMap<String, String>) -> Self {
        let serving = job.kind == "serving";
        let is_active = |state: &str| matches!(state, "pending" | "running" | "healthy");
        let mut active: BTreeMap<String, usize> = BTreeMap::new();
        for allocation in job
            .allocations
            .iter()
            .filter(|a| is_active(&a.state) && !a.stop_requested)
        {
            let name = agent_names
                .get(&allocation.agent)
                .cloned()
                .unwrap_or_else(|| allocation.agent.clone());
            *active.entry(name).or_insert(0) += 1;
        }
        let done = if serving {
            job.allocations
                .iter()
                .filter(|a| a.state == "healthy" && !a.stop_requested)
                .count() as u32
        } else {
            job.progress.succeeded
        };
        Self {
            name: job.name.clone(),
            kind: job.kind.clone(),
            state: job.state.clone(),
            done,
            total: job.progress.total,
            active: active.into_iter().collect(),
            n_lost: job.allocations.iter().filter(|a| a.state == "lost").count(),
        }
    }

    /// `workload-infer  [######------] 4/8 done    running   cloud-gpu 2, 2 lost`
    pub fn render(&self) -> String {
        let filled = if self.total == 0 {
            0
        } else {
            (self.done.min(self.total) as usize * BAR_CELLS) / self.total as usize
        };
        let bar = format!("{}{}", "#".repeat(filled), "-".repeat(BAR_CELLS - filled));
        let counted = if self.kind == "serving" {
            "healthy"
        } else {
            "done"
        };
        let count = format!("{}/{} {counted}", self.done, self.total);
        let mut detail: Vec<String> = self
            .active
            .iter()
            .map(|(name, n)| format!("{name} {n}"))
            .collect();
        if self.n_lost > 0 {
            detail.push(format!("{} lost", self.n_lost));
        }
        format!(
            "{:<15} [{bar}] {count:<11} {:<9} {}",
            self.name,
            self.state,
            detail.join(", ")
        )
        .trim_end()
        .to_string()
    }
}

/// Writes progress lines and notes to one stream.
pub struct Progress {
    out: Box<dyn Write + Send>,
    /// Redraw in place (a terminal) or print changed lines (anything else).
    in_place: bool,
    started: Instant,
    /// Terminal: lines of the bar block now on screen below the cursor's line start.
    drawn: usize,
    /// Terminal: the bar block last drawn, drawn again below a note.
    block: Vec<String>,
    /// Plain: the last line printed per job name.
    printed: BTreeMap<String, String>,
}

impl Progress {
    pub fn new(out: Box<dyn Write + Send>, in_place: bool) -> Self {
        Self {
            out,
            in_place,
            started: Instant::now(),
            drawn: 0,
            block: Vec::new(),
            printed: BTreeMap::new(),
        }
    }

    /// Shows `lines`, one per job.
    pub fn update(&mut self, lines: &[JobLine]) {
        if self.in_place {
            let block: Vec<String> = lines
                .iter()
                .map(|line| {
                    line.render()
                        .chars()
                        .take(IN_PLACE_LINE_CHARS_MAX)
                        .collect()
                })
                .collect();
            if block == self.block && self.drawn == block.len() {
                return;
            }
            self.block = block;
            self.draw_block();
        } else {
            let elapsed = self.started.elapsed().as_secs_f64();
            for line in lines {
                let text = line.render();
                if self.printed.get(&line.name) != Some(&text) {
                    let _ = writeln!(self.out, "[{elapsed:>5.1}s] {text}");
                    self.printed.insert(line.name.clone(), text);
                }
            }
        }
        let _ = self.out.flush();
    }

    /// Prints `text` above the bars.
    pub fn note(&mut self, text: &str) {
        if self.drawn > 0 {
            self.clear_block();
            let _ = writeln!(self.out, "{text}");
            self.draw_block();
        } else {
            let _ = writeln!(self.out, "{text}");
        }
        let _ = self.out.flush();
    }

    /// Leaves the bars on screen as they are; what is written next goes below them.
    pub fn finish(&mut self) {
        self.drawn = 0;
        self.block.clear();
    }

    /// Terminal: erases the bar block on screen and draws [`Progress::block`] in its place.
    fn draw_block(&mut self) {
        self.clear_block();
        for line in &self.block {
            let _ = writeln!(self.out, "{line}");
        }
        self.drawn = self.block.len();
    }

    /// Terminal: moves up over the bar block and erases it.
    fn clear_block(&mut self) {
        if self.in_place && self.drawn > 0 {
            // Cursor up `drawn` lines, to column 1, then erase to the end of the screen.
            let _ = write!(self.out, "\x1b[{}F\x1b[0J", self.drawn);
        }
        self.drawn = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_coordinator::api::types::{AllocationView, Progress as Done};
    use std::sync::{Arc, Mutex};

    fn allocation(unit: u32, agent: &str, state: &str) -> AllocationView {
        AllocationView {
            id: format!("j-{unit}-1"),
            unit,
            attempt: 1,
            agent: agent.into(),
            node: "local".into(),
            state: state.into(),
            exit_code: None,
            reason: None,
            gpus: vec![0],
            port: None,
            restarts: 0,
            stop_requested: false,
            generation: 0,
            image: None,
            started_at_unix_ms: None,
            ended_at_unix_ms: None,
        }
    }

    fn job(kind: &str, state: &str, succeeded: u32, allocations: Vec<AllocationView>) -> JobView {
        JobView {
            id: "j".into(),
            name: "workload-infer".into(),
            team: "default".into(),
            kind: kind.into(),
            state: state.into(),
            spec: serde_json::Value::Null,
            submitted_by: "admin".into(),
            submitted_at_unix_ms: 0,
            updated_at_unix_ms: 0,
            idempotency_key: None,
            progress: Done {
                succeeded,
                total: 8,
            },
            restarts: 0,
            generation: 0,
            failure: None,
            allocations,
            inputs: Vec::new(),
            artifacts: Vec::new(),
        }
    }

    fn names() -> BTreeMap<String, String> {
        [("agent-1", "onprem-gpu"), ("agent-2", "cloud-gpu")]
            .into_iter()
            .map(|(id, name)| (id.to_string(), name.to_string()))
            .collect()
    }

    #[test]
    fn a_line_counts_units_done_and_where_the_others_are() {
        let batch = job(
            "batch",
            "running",
            4,
            vec![
                allocation(0, "agent-1", "lost"),
                allocation(1, "agent-1", "lost"),
                allocation(0, "agent-2", "running"),
                allocation(1, "agent-2", "pending"),
                allocation(2, "agent-2", "succeeded"),
            ],
        );
        let line = JobLine::of(&batch, &names());
        assert_eq!(line.active, vec![("cloud-gpu".to_string(), 2)]);
        assert_eq!(line.n_lost, 2);
        assert_eq!(
            line.render(),
            "workload-infer  [######------] 4/8 done    running   cloud-gpu 2, 2 lost"
        );
    }

    #[test]
    fn a_serving_line_counts_healthy_replicas() {
        let mut serving = job(
            "serving",
            "running",
            0,
            vec![
                allocation(0, "agent-1", "healthy"),
                allocation(1, "agent-2", "running"),
            ],
        );
        serving.progress.total = 2;
        let line = JobLine::of(&serving, &names());
        assert_eq!(line.done, 1);
        assert!(
            line.render().contains("[######------] 1/2 healthy running"),
            "{}",
            line.render()
        );
    }

    /// A writer whose bytes the test can read afterwards.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    #[test]
    fn plain_output_prints_a_line_only_when_it_changes() {
        let out = Captured::default();
        let mut progress = Progress::new(Box::new(out.clone()), false);
        let running = JobLine::of(&job("batch", "running", 1, Vec::new()), &names());
        progress.update(std::slice::from_ref(&running));
        progress.update(std::slice::from_ref(&running));
        progress.note("killed onprem-gpu");
        let done = JobLine::of(&job("batch", "succeeded", 8, Vec::new()), &names());
        progress.update(&[done]);
        let text = out.text();
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(!text.contains('\x1b'), "no escape codes off a terminal");
        assert!(
            text.lines().nth(1).unwrap() == "killed onprem-gpu",
            "{text}"
        );
        assert!(text.lines().nth(2).unwrap().contains("8/8"), "{text}");
    }

    #[test]
    fn a_terminal_redraws_the_bars_in_place_below_the_notes() {
        let out = Captured::default();
        let mut progress = Progress::new(Box::new(out.clone()), true);
        let line = JobLine::of(&job("batch", "running", 1, Vec::new()), &names());
        let further = JobLine::of(&job("batch", "running", 2, Vec::new()), &names());
        progress.update(&[line.clone(), line.clone()]);
        progress.update(&[line.clone(), line.clone()]); // unchanged: not drawn again
        progress.update(&[line.clone(), further]);
        progress.note("a note");
        progress.update(std::slice::from_ref(&line));
        progress.finish();
        progress.note("after");
        let text = out.text();
        // The changed update, the note and the last update each first erase the two lines drawn
        // before (the note draws them again below itself); after `finish` the last bar stays.
        assert_eq!(text.matches("\x1b[2F\x1b[0J").count(), 3, "{text:?}");
        assert_eq!(text.matches("\x1b[").count(), 6, "{text:?}");
        assert!(text.contains("a note\n"), "{text:?}");
        assert!(text.ends_with("1/8 done    running\nafter\n"), "{text:?}");
    }
}
