//! What to send: request bodies for each workload and the priority classes requests belong to.
//!
//! Bodies are built before the run (small, stream: a ring of distinct prompts) or from
//! pre-built pieces (prefix: per-group system prompts and a text pool sliced per request), so
//! the generator spends next to no CPU per request. Sizes are in the shared tokenizer's tokens
//! (`infergate_protocol::tokenizer`: 4 characters per token); the text is ASCII words, so it is the same
//! size in bytes.

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use serde::Serialize;

/// Which request shape to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// Small non-streaming `/v1/completions`.
    Small,
    /// Streaming `/v1/chat/completions`.
    Stream,
    /// Shared-prefix multi-turn streaming chat sessions, interleaved across groups.
    Prefix,
}

/// Sizes and knobs of a workload.
#[derive(Clone, Debug)]
pub struct Spec {
    pub kind: Kind,
    pub model: String,
    /// Prompt tokens (small, stream).
    pub prompt_tokens: u32,
    /// Output tokens asked for (`max_tokens`).
    pub max_tokens: u32,
    /// Distinct prompts cycled through (small, stream).
    pub distinct: u32,
    /// Prefix groups.
    pub groups: u32,
    /// Users (sessions) per group.
    pub users: u32,
    /// System prompt tokens shared by a group.
    pub system_tokens: u32,
    /// Question tokens per turn.
    pub question_tokens: u32,
    /// Turns per session.
    pub turns: u32,
    /// Popularity skew of the groups: 0 gives every group the same share of sessions; s > 0
    /// draws each session's group from a Zipf(s) law (group 0 the most popular), as real
    /// fleets see a few applications' system prompts dominate.
    pub group_skew: f64,
    /// With skew: every this many rounds (0: never) the popularity ranking
    /// rotates by 3/8 of the groups, so the hottest groups turn cold and
    /// others hot (popularity that shifts during a run).
    pub skew_shift_rounds: u32,
    /// Ask for a usage chunk on streams (`stream_options.include_usage`).
    pub usage: bool,
    /// Send `ignore_eos: true` so real engines produce exactly `max_tokens`.
    pub ignore_eos: bool,
    /// Varies every text, so runs against the same fleet do not hit each other's caches.
    pub seed: u64,
}

/// A priority class: a share of the requests that carries its own headers.
#[derive(Clone, Debug)]
pub struct Class {
    pub name: String,
    pub share: f64,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl std::str::FromStr for Class {
    type Err = String;

    /// `NAME=SHARE[,HEADER:VALUE]...`, e.g. `critical=0.2,x-gateway-inference-objective:critical`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let head = parts.next().unwrap_or_default();
        let (name, share) = head
            .split_once('=')
            .ok_or_else(|| format!("class {s:?}: expected NAME=SHARE[,HEADER:VALUE]..."))?;
        let share: f64 = share
            .parse()
            .map_err(|_| format!("class {s:?}: share {share:?} is not a number"))?;
        if name.is_empty() || !(share > 0.0 && share.is_finite()) {
            return Err(format!("class {s:?}: needs a name and a share > 0"));
        }
        let headers = parts.map(parse_header).collect::<Result<_, _>>()?;
        Ok(Class {
            name: name.to_string(),
            share,
            headers,
        })
    }
}

/// `NAME:VALUE` into a header pair.
pub fn parse_header(s: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (k, v) = s
        .split_once(':')
        .ok_or_else(|| format!("header {s:?}: expected NAME:VALUE"))?;
    let name = HeaderName::try_from(k.trim()).map_err(|e| format!("header {k:?}: {e}"))?;
    let value = HeaderValue::try_from(v.trim()).map_err(|e| format!("header value {v:?}: {e}"))?;
    Ok((name, value))
}

/// Picks request `seq`'s class by a hash of `seq`, so shares hold at any count and the
/// sequence is the same in every run with the same seed.
pub struct ClassPicker {
    cumulative: Vec<f64>,
    seed: u64,
}

impl ClassPicker {
    pub fn new(classes: &[Class], seed: u64) -> Self {
        Self {
            cumulative: cumulative(classes.iter().map(|c| c.share)),
            seed,
        }
    }

    pub fn pick(&self, seq: u64) -> usize {
        pick_cumulative(
            &self.cumulative,
            splitmix64(seq ^ self.seed.rotate_left(17)),
        )
    }
}

/// Cumulative shares (ending at 1) of `weights`.
fn cumulative(weights: impl Iterator<Item = f64> + Clone) -> Vec<f64> {
    let total: f64 = weights.clone().sum();
    let mut acc = 0.0;
    weights
        .map(|w| {
            acc += w / total;
            acc
        })
        .collect()
}

/// The index a uniform draw from `hash` falls on in `cumulative` shares.
fn pick_cumulative(cumulative: &[f64], hash: u64) -> usize {
    let u = (hash >> 11) as f64 / (1u64 << 53) as f64;
    cumulative
        .iter()
        .position(|&c| u < c)
        .unwrap_or(cumulative.len().saturating_sub(1))
}

pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Deterministic filler text: words from a small vocabulary, separated by spaces.
struct TextPool(String);

const WORDS: &[&str] = &[
    "the", "model", "serves", "tokens", "while", "a", "gateway", "routes", "each", "request", "to",
    "replica", "with", "warm", "cache", "and", "short", "queue", "prefix", "blocks", "stay",
    "where", "they", "were", "computed", "so", "time", "first", "token", "drops",
];

impl TextPool {
    fn new(chars: usize, seed: u64) -> Self {
        let mut s = String::with_capacity(chars + 16);
        let mut x = seed;
        while s.len() < chars {
            x = splitmix64(x);
            s.push_str(WORDS[(x % WORDS.len() as u64) as usize]);
            s.push(' ');
        }
        s.truncate(chars);
        Self(s)
    }

    /// `label` followed by pool text, exactly `tokens` tokens (`4 * tokens` chars) long
    /// (longer only if the label alone is), starting at a pool offset chosen by `key`.
    fn text(&self, label: &str, tokens: u32, key: u64) -> String {
        let want = tokens as usize * infergate_protocol::tokenizer::CHARS_PER_TOKEN;
        let fill = want.saturating_sub(label.len());
        let room = self.0.len() - fill;
        let start = (splitmix64(key) % (room as u64 + 1)) as usize;
        let mut s = String::with_capacity(label.len() + fill);
        s.push_str(label);
        s.push_str(&self.0[start..start + fill]);
        s
    }
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'a str,
    content: &'a str,
}

#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    messages: Option<&'a [Message<'a>]>,
    max_tokens: u32,
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    ignore_eos: bool,
}

/// The request source of a run.
pub struct Workload {
    spec: Spec,
    pub path: &'static str,
    pub stream: bool,
    ring: Vec<Bytes>,
    systems: Vec<String>,
    /// Cumulative Zipf shares of the groups (empty when `group_skew` is 0).
    popularity: Vec<f64>,
    pool: TextPool,
}

impl Workload {
    pub fn new(spec: Spec) -> Result<Self, String> {
        let (path, stream) = match spec.kind {
            Kind::Small => ("/v1/completions", false),
            Kind::Stream | Kind::Prefix => ("/v1/chat/completions", true),
        };
        let longest = [
            spec.prompt_tokens,
            spec.system_tokens,
            spec.question_tokens,
            spec.max_tokens,
        ]
        .into_iter()
        .max()
        .unwrap_or(0) as usize;
        if spec.kind == Kind::Prefix && (spec.groups == 0 || spec.users == 0 || spec.turns == 0) {
            return Err("prefix workload needs --groups, --users and --turns >= 1".into());
        }
        if !(spec.group_skew >= 0.0 && spec.group_skew.is_finite()) {
            return Err(format!("group skew {} must be >= 0", spec.group_skew));
        }
        if longest > 1 << 20 {
            return Err(format!("{longest} tokens is more than this tool builds"));
        }
        // Twice the longest piece, so slices start at many different offsets.
        let pool = TextPool::new(
            2 * longest * infergate_protocol::tokenizer::CHARS_PER_TOKEN + 4096,
            spec.seed,
        );
        let mut w = Self {
            path,
            stream,
            ring: Vec::new(),
            systems: Vec::new(),
            popularity: Vec::new(),
            pool,
            spec,
        };
        match w.spec.kind {
            Kind::Small | Kind::Stream => {
                w.ring = (0..w.spec.distinct.max(1) as u64)
                    .map(|i| {
                        let prompt = w.pool.text(
                            &format!("s{} p{i}: ", w.spec.seed),
                            w.spec.prompt_tokens,
                            i,
                        );
                        w.encode(&prompt, &[])
                    })
                    .collect();
            }
            Kind::Prefix => {
                w.systems = (0..w.spec.groups as u64)
                    .map(|g| {
                        let label = format!("s{} g{g} system: ", w.spec.seed);
                        w.pool.text(&label, w.spec.system_tokens, g ^ 0x5157)
                    })
                    .collect();
                if w.spec.group_skew > 0.0 {
                    w.popularity = cumulative(
                        (1..=w.spec.groups).map(|rank| (rank as f64).powf(-w.spec.group_skew)),
                    );
                }
            }
        }
        Ok(w)
    }

    /// Requests in one round of the prefix schedule (every session's every turn).
    pub fn round_len(&self) -> u64 {
        self.spec.groups as u64 * self.spec.users as u64 * self.spec.turns as u64
    }

    /// Body of request number `seq`.
    pub fn body(&self, seq: u64) -> Bytes {
        match self.spec.kind {
            Kind::Small | Kind::Stream => {
                self.ring[(seq % self.ring.len() as u64) as usize].clone()
            }
            Kind::Prefix => self.prefix_body(seq),
        }
    }

    /// Schedule: round by round (a round is new sessions for every user of every group);
    /// inside a round turn by turn, inside a turn user by user, and groups fastest, so
    /// consecutive requests belong to different groups and a session's next turn comes
    /// `groups * users` requests after its previous one.
    pub fn prefix_position(&self, seq: u64) -> (u64, u32, u32, u32) {
        let (g, u) = (self.spec.groups as u64, self.spec.users as u64);
        let round = seq / self.round_len();
        let i = seq % self.round_len();
        let turn = i / (g * u);
        let user = (i % (g * u)) / g;
        let group = i % g;
        (round, turn as u32, user as u32, group as u32)
    }

    /// The group whose system prompt the session in schedule slot `(round, user, slot)` uses:
    /// the slot itself without skew, else a Zipf draw fixed for the session (every turn of
    /// a session keeps its system prompt).
    pub fn session_group(&self, round: u64, user: u32, slot: u32) -> u32 {
        if self.popularity.is_empty() {
            return slot;
        }
        let h = splitmix64(
            self.spec.seed.rotate_left(29) ^ round ^ ((slot as u64) << 20) ^ ((user as u64) << 40),
        );
        let rank = pick_cumulative(&self.popularity, h) as u64;
        let groups = u64::from(self.spec.groups);
        let shift = match self.spec.skew_shift_rounds {
            0 => 0,
            k => round / u64::from(k) * (groups * 3 / 8).max(1),
        };
        ((rank + shift) % groups) as u32
    }

    fn prefix_body(&self, seq: u64) -> Bytes {
        let (round, turn, user, group) = self.prefix_position(seq);
        let system = self.session_group(round, user, group);
        let s = &self.spec;
        let key = |t: u32, what: u64| {
            splitmix64(
                round ^ ((group as u64) << 20) ^ ((user as u64) << 36) ^ ((t as u64) << 52) ^ what,
            )
        };
        let mut texts = Vec::with_capacity(2 * turn as usize + 1);
        for t in 0..=turn {
            let label = format!("s{} r{round} g{group} u{user} t{t} question: ", s.seed);
            texts.push(self.pool.text(&label, s.question_tokens, key(t, 1)));
            if t < turn {
                texts.push(self.pool.text("answer: ", s.max_tokens, key(t, 2)));
            }
        }
        let mut messages = Vec::with_capacity(texts.len() + 1);
        messages.push(Message {
            role: "system",
            content: &self.systems[system as usize],
        });
        for (i, text) in texts.iter().enumerate() {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            messages.push(Message {
                role,
                content: text,
            });
        }
        self.encode("", &messages)
    }

    fn encode(&self, prompt: &str, messages: &[Message]) -> Bytes {
        let s = &self.spec;
        let chat = self.path == "/v1/chat/completions";
        let single;
        let messages = if chat && messages.is_empty() {
            single = [Message {
                role: "user",
                content: prompt,
            }];
            &single[..]
        } else {
            messages
        };
        let body = Body {
            model: &s.model,
            prompt: (!chat).then_some(prompt),
            messages: chat.then_some(messages),
            max_tokens: s.max_tokens,
            stream: self.stream,
            stream_options: (self.stream && s.usage).then_some(StreamOptions {
                include_usage: true,
            }),
            ignore_eos: s.ignore_eos,
        };
        // Serializing borrowed strings and integers into a Vec cannot fail.
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use infergate_protocol::tokenizer::count_tokens;

    fn spec(kind: Kind) -> Spec {
        Spec {
            kind,
            model: "m".into(),
            prompt_tokens: 10,
            max_tokens: 8,
            distinct: 4,
            groups: 3,
            users: 2,
            system_tokens: 100,
            question_tokens: 20,
            turns: 2,
            group_skew: 0.0,
            skew_shift_rounds: 0,
            usage: true,
            ignore_eos: false,
            seed: 7,
        }
    }

    fn json(b: &Bytes) -> serde_json::Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn small_and_stream_bodies_have_the_asked_sizes() {
        let w = Workload::new(spec(Kind::Small)).unwrap();
        let v = json(&w.body(0));
        assert_eq!(count_tokens(v["prompt"].as_str().unwrap()), 10);
        assert_eq!(v["max_tokens"], 8);
        assert_eq!(v["stream"], false);
        assert!(v.get("stream_options").is_none());
        assert_ne!(w.body(0), w.body(1));
        assert_eq!(w.body(0), w.body(4));

        let w = Workload::new(spec(Kind::Stream)).unwrap();
        let v = json(&w.body(0));
        assert_eq!(v["messages"][0]["role"], "user");
        assert_eq!(v["stream_options"]["include_usage"], true);
    }

    #[test]
    fn prefix_sessions_share_the_group_system_prompt_and_grow_by_turn() {
        let w = Workload::new(spec(Kind::Prefix)).unwrap();
        assert_eq!(w.round_len(), 12);
        // Groups are interleaved: consecutive requests go to different groups.
        assert_eq!(w.prefix_position(0), (0, 0, 0, 0));
        assert_eq!(w.prefix_position(1), (0, 0, 0, 1));
        assert_eq!(w.prefix_position(3), (0, 0, 1, 0));
        assert_eq!(w.prefix_position(6), (0, 1, 0, 0));
        assert_eq!(w.prefix_position(12), (1, 0, 0, 0));

        let first = json(&w.body(0));
        let same_group = json(&w.body(3));
        let other_group = json(&w.body(1));
        let second_turn = json(&w.body(6));
        let sys = first["messages"][0]["content"].as_str().unwrap();
        assert_eq!(count_tokens(sys), 100);
        assert_eq!(same_group["messages"][0]["content"], sys);
        assert_ne!(other_group["messages"][0]["content"], sys);
        assert_ne!(first["messages"][1], same_group["messages"][1]);
        // Turn 2 of session (g0, u0) repeats turn 1's question and adds an answer and a question.
        let msgs = second_turn["messages"].as_array().unwrap();
        assert_eq!(msgs.len(), 4);
        assert_eq!(msgs[1], first["messages"][1]);
        assert_eq!(msgs[2]["role"], "assistant");
        assert_eq!(count_tokens(msgs[2]["content"].as_str().unwrap()), 8);
        assert_eq!(count_tokens(msgs[3]["content"].as_str().unwrap()), 20);
        // A new round starts new sessions on the same system prompts.
        let next_round = json(&w.body(12));
        assert_eq!(next_round["messages"][0]["content"], sys);
        assert_ne!(next_round["messages"][1], first["messages"][1]);
    }

    #[test]
    fn skewed_groups_follow_zipf_and_a_session_keeps_its_system_prompt() {
        let w = Workload::new(Spec {
            groups: 32,
            users: 8,
            turns: 3,
            group_skew: 1.0,
            ..spec(Kind::Prefix)
        })
        .unwrap();
        let mut counts = [0u32; 32];
        for round in 0..200 {
            for user in 0..8 {
                for slot in 0..32 {
                    counts[w.session_group(round, user, slot) as usize] += 1;
                }
            }
        }
        // Zipf(1) over 32 groups: the top group has 1/H(32) = 24.6% of 51,200 sessions,
        // the second half that, the last 1/32 of the first.
        let share = |g: usize| counts[g] as f64 / 51_200.0;
        assert!((share(0) - 0.246).abs() < 0.01, "{}", share(0));
        assert!((share(1) - 0.123).abs() < 0.01, "{}", share(1));
        assert!(counts[31] > 0 && share(31) < 0.02);
        // Every turn of a session (same round, user and slot) has the same system prompt.
        let (first, third) = (json(&w.body(5)), json(&w.body(5 + 2 * 32 * 8)));
        assert_eq!(w.prefix_position(5).0, w.prefix_position(5 + 2 * 32 * 8).0);
        assert_eq!(first["messages"][0], third["messages"][0]);
        assert_eq!(third["messages"].as_array().unwrap().len(), 6);
        // No skew: the slot is the group.
        let flat = Workload::new(spec(Kind::Prefix)).unwrap();
        assert_eq!(flat.session_group(3, 1, 2), 2);
        assert!(Workload::new(Spec {
            group_skew: -1.0,
            ..spec(Kind::Prefix)
        })
        .is_err());
    }

    #[test]
    fn popularity_shifts_every_k_rounds() {
        let w = Workload::new(Spec {
            groups: 24,
            users: 8,
            group_skew: 1.2,
            skew_shift_rounds: 2,
            ..spec(Kind::Prefix)
        })
        .unwrap();
        // The most popular group of rounds 0..2, 2..4 and 4..6.
        let hottest = |rounds: std::ops::Range<u64>| {
            let mut counts = [0u32; 24];
            for round in rounds {
                for user in 0..8 {
                    for slot in 0..24 {
                        counts[w.session_group(round, user, slot) as usize] += 1;
                    }
                }
            }
            (0..24).max_by_key(|g| counts[*g]).unwrap_or(0)
        };
        let (a, b, c) = (hottest(0..2), hottest(2..4), hottest(4..6));
        assert_eq!(a, 0, "rank 0 first");
        assert_eq!(b, 9, "then rotated by 3/8 of 24");
        assert_eq!(c, 18);
        // A session keeps its group over its turns (the group is drawn per round).
        assert_eq!(w.session_group(3, 1, 2), w.session_group(3, 1, 2));
    }

    #[test]
    fn another_seed_changes_every_text() {
        let a = Workload::new(spec(Kind::Prefix)).unwrap();
        let b = Workload::new(Spec {
            seed: 8,
            ..spec(Kind::Prefix)
        })
        .unwrap();
        assert_ne!(
            json(&a.body(0))["messages"][0],
            json(&b.body(0))["messages"][0]
        );
    }

    #[test]
    fn classes_parse_and_split_by_share() {
        let c: Class = "critical=1,x-gateway-inference-objective:critical,x-a:b"
            .parse()
            .unwrap();
        assert_eq!(c.name, "critical");
        assert_eq!(c.headers.len(), 2);
        assert!("x".parse::<Class>().is_err());
        assert!("x=0".parse::<Class>().is_err());
        assert!("x=1,bad".parse::<Class>().is_err());
        let classes = vec![
            Class {
                name: "a".into(),
                share: 1.0,
                headers: vec![],
            },
            Class {
                name: "b".into(),
                share: 3.0,
                headers: vec![],
            },
        ];
        let p = ClassPicker::new(&classes, 1);
        let b = (0..10_000).filter(|&i| p.pick(i) == 1).count();
        assert!((7_200..7_800).contains(&b), "{b}");
    }
}
