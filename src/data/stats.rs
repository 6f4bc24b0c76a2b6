//! Data-set summaries: counts per split/location/membrane flag and sequence lengths, as text
//! (`protloc data stats FILE`), JSON (via serde) and a length histogram PNG.
//!
//! Length figures matter for choosing the model's maximum length: ProtBERT and ESM-2 take 512
//! and 1022 residues (plus special tokens), hence the `> 512` and `> 1022` counts.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::Serialize;

use super::{Membrane, Record};

/// Name used for records without a location label.
pub const UNLABELED: &str = "(none)";

/// Summary of a set of records. See [`DatasetStats::compute`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatasetStats {
    pub total: usize,
    /// Records not tagged as test.
    pub train: usize,
    /// Records tagged as test.
    pub test: usize,
    /// One row per location (unlabeled as [`UNLABELED`]), most frequent first.
    pub locations: Vec<LocationCount>,
    /// Counts for `M`, `S`, `U`, in that order (zeros included so the table is stable).
    pub membrane: Vec<MembraneCount>,
    pub lengths: LengthSummary,
}

/// Records of one location, overall and per split.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LocationCount {
    pub location: String,
    pub total: usize,
    pub train: usize,
    pub test: usize,
}

/// Records with one membrane flag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MembraneCount {
    /// `M`, `S` or `U`.
    pub flag: char,
    pub count: usize,
}

/// Sequence length distribution, in residues. All zero for an empty set.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LengthSummary {
    pub min: usize,
    pub max: usize,
    pub mean: f64,
    /// Middle value (mean of the two middle values for an even count).
    pub median: f64,
    /// Nearest-rank percentiles: the smallest length with at least 90% / 99% of records at or
    /// below it.
    pub p90: usize,
    pub p99: usize,
    /// Records longer than 512 / 1022 residues (truncated by 512- / 1024-token models).
    pub over_512: usize,
    pub over_1022: usize,
}

impl LengthSummary {
    fn compute(mut lengths: Vec<usize>) -> LengthSummary {
        lengths.sort_unstable();
        let n = lengths.len();
        if n == 0 {
            return LengthSummary {
                min: 0,
                max: 0,
                mean: 0.0,
                median: 0.0,
                p90: 0,
                p99: 0,
                over_512: 0,
                over_1022: 0,
            };
        }
        let median = if n % 2 == 1 {
            lengths[n / 2] as f64
        } else {
            (lengths[n / 2 - 1] + lengths[n / 2]) as f64 / 2.0
        };
        LengthSummary {
            min: lengths[0],
            max: lengths[n - 1],
            mean: lengths.iter().sum::<usize>() as f64 / n as f64,
            median,
            p90: percentile(&lengths, 90),
            p99: percentile(&lengths, 99),
            over_512: lengths.iter().filter(|&&l| l > 512).count(),
            over_1022: lengths.iter().filter(|&&l| l > 1022).count(),
        }
    }
}

/// Nearest-rank percentile of sorted, non-empty `sorted`.
fn percentile(sorted: &[usize], pct: usize) -> usize {
    // ceil(pct * n / 100) in integers, clamped to a valid 1-based rank.
    let rank = (pct * sorted.len()).div_ceil(100).clamp(1, sorted.len());
    sorted[rank - 1]
}

impl DatasetStats {
    /// Computes the summary. Sequence length is the number of residues.
    pub fn compute(records: &[Record]) -> DatasetStats {
        let mut by_location: HashMap<&str, LocationCount> = HashMap::new();
        let (mut m, mut s, mut u) = (0, 0, 0);
        let mut test = 0;
        for r in records {
            let name = r.location.as_deref().unwrap_or(UNLABELED);
            let row = by_location.entry(name).or_insert_with(|| LocationCount {
                location: name.to_string(),
                total: 0,
                train: 0,
                test: 0,
            });
            row.total += 1;
            if r.is_test {
                row.test += 1;
                test += 1;
            } else {
                row.train += 1;
            }
            match r.membrane {
                Membrane::Membrane => m += 1,
                Membrane::Soluble => s += 1,
                Membrane::Unknown => u += 1,
            }
        }
        let mut locations: Vec<LocationCount> = by_location.into_values().collect();
        // Name as tie-breaker keeps the order deterministic (HashMap order is not).
        locations.sort_by(|a, b| b.total.cmp(&a.total).then(a.location.cmp(&b.location)));
        DatasetStats {
            total: records.len(),
            train: records.len() - test,
            test,
            locations,
            membrane: vec![
                MembraneCount {
                    flag: 'M',
                    count: m,
                },
                MembraneCount {
                    flag: 'S',
                    count: s,
                },
                MembraneCount {
                    flag: 'U',
                    count: u,
                },
            ],
            lengths: LengthSummary::compute(records.iter().map(|r| r.sequence.len()).collect()),
        }
    }
}

/// Percentage for display; 0 for an empty denominator instead of NaN.
fn pct(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

impl fmt::Display for DatasetStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "records: {} (train {}, test {})",
            self.total, self.train, self.test
        )?;
        let width = self
            .locations
            .iter()
            .map(|l| l.location.len())
            .chain(["location".len()])
            .max()
            .unwrap_or(0);
        writeln!(f)?;
        writeln!(
            f,
            "{:<width$}  {:>7}  {:>6}  {:>7}  {:>7}",
            "location", "total", "%", "train", "test"
        )?;
        for l in &self.locations {
            writeln!(
                f,
                "{:<width$}  {:>7}  {:>6.1}  {:>7}  {:>7}",
                l.location,
                l.total,
                pct(l.total, self.total),
                l.train,
                l.test
            )?;
        }
        writeln!(f)?;
        writeln!(f, "{:<width$}  {:>7}  {:>6}", "membrane", "count", "%")?;
        for m in &self.membrane {
            let name = match m.flag {
                'M' => "M (membrane)",
                'S' => "S (soluble)",
                _ => "U (unknown)",
            };
            writeln!(
                f,
                "{:<width$}  {:>7}  {:>6.1}",
                name,
                m.count,
                pct(m.count, self.total)
            )?;
        }
        let l = &self.lengths;
        writeln!(f)?;
        writeln!(
            f,
            "length: min {}  median {}  mean {:.1}  p90 {}  p99 {}  max {}",
            l.min, l.median, l.mean, l.p90, l.p99, l.max
        )?;
        write!(
            f,
            "        > 512: {} ({:.1}%)  > 1022: {} ({:.1}%)",
            l.over_512,
            pct(l.over_512, self.total),
            l.over_1022,
            pct(l.over_1022, self.total)
        )
    }
}

/// Histogram bins: regular bins `[i*width, (i+1)*width)` up to `edge`, then one overflow bin
/// for everything `>= edge`, per split.
#[derive(Debug, PartialEq)]
struct Bins {
    width: usize,
    edge: usize,
    train: Vec<usize>,
    test: Vec<usize>,
}

/// Longest length shown on the x axis before the overflow bin: outliers (titin is 35k
/// residues) would otherwise squash the bulk of the distribution into a few bars.
const MAX_AXIS_LENGTH: usize = 2000;
const TARGET_BINS: usize = 50;

fn bin_lengths(records: &[Record]) -> Bins {
    let mut lengths: Vec<usize> = records.iter().map(|r| r.sequence.len()).collect();
    lengths.sort_unstable();
    let clip = if lengths.is_empty() {
        1
    } else {
        percentile(&lengths, 99).clamp(1, MAX_AXIS_LENGTH)
    };
    // A "nice" bin width (1, 2, 5 x 10^k) giving at most TARGET_BINS bins up to `clip`.
    let mut width = 1;
    'outer: for scale in [1, 10, 100, 1000] {
        for step in [1, 2, 5] {
            width = step * scale;
            if clip.div_ceil(width) <= TARGET_BINS {
                break 'outer;
            }
        }
    }
    // Regular bins cover 0..edge (edge = clip rounded up to a bin boundary); everything at
    // or past `edge` goes to the overflow bin.
    let n_regular = clip.div_ceil(width);
    let edge = n_regular * width;
    let mut train = vec![0; n_regular + 1];
    let mut test = vec![0; n_regular + 1];
    for r in records {
        let bin = (r.sequence.len() / width).min(n_regular);
        if r.is_test {
            test[bin] += 1;
        } else {
            train[bin] += 1;
        }
    }
    Bins {
        width,
        edge,
        train,
        test,
    }
}

/// Writes a PNG histogram of sequence lengths to `path`: train and test stacked, x axis
/// clipped at the 99th percentile (at most 2000 residues) with an overflow bin on the right.
///
/// The image is rendered to a temporary file in the same directory and renamed into place, so
/// `path` never holds a half-written image.
pub fn plot_length_histogram(records: &[Record], path: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(!records.is_empty(), "no records to plot");
    let bins = bin_lengths(records);
    // The .png suffix matters: the bitmap backend picks the image format from the extension.
    crate::artifacts::write_atomic_path(path, ".png", |tmp| {
        draw_histogram(&bins, records.len(), tmp)
            .with_context(|| format!("cannot render histogram {}", path.display()))
    })
}

fn draw_histogram(bins: &Bins, total: usize, out: &Path) -> anyhow::Result<()> {
    const TRAIN_COLOR: RGBColor = RGBColor(31, 119, 180);
    const TEST_COLOR: RGBColor = RGBColor(255, 127, 14);

    let n_bins = bins.train.len();
    let x_max = (n_bins * bins.width) as f64;
    let y_max = bins
        .train
        .iter()
        .zip(&bins.test)
        .map(|(a, b)| a + b)
        .max()
        .unwrap_or(0)
        .max(1) as f64
        * 1.1;
    let n_train: usize = bins.train.iter().sum();
    let n_test: usize = bins.test.iter().sum();

    let root = BitMapBackend::new(out, (1000, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Sequence length distribution ({total} proteins)"),
            ("sans-serif", 26),
        )
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
    let edge = bins.edge;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(TRANSPARENT)
        .x_desc(format!(
            "sequence length (residues; last bar: >= {edge}, bin width {})",
            bins.width
        ))
        .y_desc("proteins")
        .x_label_formatter(&|x| format!("{:.0}", x))
        .y_label_formatter(&|y| format!("{:.0}", y))
        .axis_desc_style(("sans-serif", 18))
        .draw()?;

    let w = bins.width as f64;
    let bar = |i: usize, lo: usize, hi: usize, color: RGBColor| {
        let x0 = i as f64 * w;
        // Small gap between bars; the overflow bar is hatched-looking via a lighter shade.
        let style = if i + 1 == n_bins {
            color.mix(0.55).filled()
        } else {
            color.filled()
        };
        Rectangle::new(
            [(x0 + w * 0.05, lo as f64), (x0 + w * 0.95, hi as f64)],
            style,
        )
    };
    if n_train > 0 {
        chart
            .draw_series(
                bins.train
                    .iter()
                    .enumerate()
                    .filter(|(_, &c)| c > 0)
                    .map(|(i, &c)| bar(i, 0, c, TRAIN_COLOR)),
            )?
            .label(format!("train ({n_train})"))
            .legend(move |(x, y)| {
                Rectangle::new([(x, y - 6), (x + 14, y + 6)], TRAIN_COLOR.filled())
            });
    }
    if n_test > 0 {
        chart
            .draw_series(
                bins.train
                    .iter()
                    .zip(&bins.test)
                    .enumerate()
                    .filter(|(_, (_, &t))| t > 0)
                    .map(|(i, (&tr, &t))| bar(i, tr, tr + t, TEST_COLOR)),
            )?
            .label(format!("test ({n_test})"))
            .legend(move |(x, y)| {
                Rectangle::new([(x, y - 6), (x + 14, y + 6)], TEST_COLOR.filled())
            });
    }
    // Say what the overflow bar holds; it is easy to misread as a real bin otherwise.
    let overflow = bins.train[n_bins - 1] + bins.test[n_bins - 1];
    // Right-aligned to the bar's right edge so the text stays inside the plot.
    let label_style =
        TextStyle::from(("sans-serif", 15).into_font()).pos(Pos::new(HPos::Right, VPos::Bottom));
    chart.draw_series(std::iter::once(Text::new(
        format!(">= {edge}: {overflow}"),
        (x_max, overflow as f64 + y_max * 0.02),
        label_style,
    )))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 18))
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::SourcePos;

    fn rec(len: usize, location: Option<&str>, membrane: Membrane, is_test: bool) -> Record {
        Record {
            id: format!("r{len}"),
            sequence: "A".repeat(len),
            location: location.map(str::to_string),
            membrane,
            is_test,
            partition: None,
            pos: SourcePos {
                file: "x".into(),
                line: 1,
            },
        }
    }

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<usize> = (1..=100).collect();
        assert_eq!(percentile(&v, 90), 90);
        assert_eq!(percentile(&v, 99), 99);
        assert_eq!(percentile(&[7], 99), 7);
        assert_eq!(percentile(&[1, 2, 3], 50), 2);
    }

    #[test]
    fn counts_and_lengths() {
        let recs = vec![
            rec(10, Some("Nucleus"), Membrane::Soluble, false),
            rec(600, Some("Nucleus"), Membrane::Soluble, true),
            rec(2000, Some("Cytoplasm"), Membrane::Membrane, false),
            rec(30, None, Membrane::Unknown, false),
        ];
        let s = DatasetStats::compute(&recs);
        assert_eq!((s.total, s.train, s.test), (4, 3, 1));
        assert_eq!(
            s.locations[0],
            LocationCount {
                location: "Nucleus".into(),
                total: 2,
                train: 1,
                test: 1
            }
        );
        // Ties ordered by name: "(none)" sorts before "Cytoplasm".
        assert_eq!(s.locations[1].location, UNLABELED);
        assert_eq!(s.locations[2].location, "Cytoplasm");
        let flags: Vec<(char, usize)> = s.membrane.iter().map(|m| (m.flag, m.count)).collect();
        assert_eq!(flags, vec![('M', 1), ('S', 2), ('U', 1)]);
        let l = &s.lengths;
        assert_eq!((l.min, l.max, l.p90, l.p99), (10, 2000, 2000, 2000));
        assert_eq!(l.median, 315.0);
        assert_eq!(l.mean, 660.0);
        assert_eq!((l.over_512, l.over_1022), (2, 1));
        let text = s.to_string();
        assert!(text.contains("records: 4 (train 3, test 1)"), "{text}");
        assert!(text.contains("> 1022: 1 (25.0%)"), "{text}");
    }

    #[test]
    fn empty_stats_do_not_panic() {
        let s = DatasetStats::compute(&[]);
        assert_eq!(s.total, 0);
        assert_eq!(s.lengths.max, 0);
        assert!(s.to_string().contains("records: 0"));
    }

    #[test]
    fn binning_clips_outliers() {
        let mut recs: Vec<Record> = (1..=200)
            .map(|i| rec(i * 5, None, Membrane::Unknown, i % 4 == 0))
            .collect();
        recs.push(rec(30_000, None, Membrane::Unknown, false));
        let b = bin_lengths(&recs);
        // p99 of 201 lengths is 995; width 20 gives 50 bins up to 1000.
        assert_eq!(b.width, 20);
        assert_eq!(b.edge, 1000);
        assert_eq!(b.train.len(), 51);
        let total: usize = b.train.iter().chain(&b.test).sum();
        assert_eq!(total, 201);
        let last = b.train.len() - 1;
        assert_eq!(b.train[last] + b.test[last], 2); // 1000 and 30000
        assert_eq!(b.test.iter().sum::<usize>(), 50);
    }
}
