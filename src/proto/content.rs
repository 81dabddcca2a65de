//! The content inspector: header and MIME rules applied to a message as it streams through.
//!
//! It owns one question: which content rule a message breaks (the `header`, `mime` and `body`
//! match criteria of ASA `inspect esmtp`: header size and line length, denied header names,
//! attachment file names and lengths, transfer encodings, body line length), reported as soon
//! as it is certain, so that the engine can refuse the message before the upstream has it.
//! It reads the bytes that go to the upstream, in any split, one byte per call included, and
//! the findings do not depend on the split. It must not touch sessions, policy files, replies
//! or sockets (the caller maps each [`Rule`] to an action), and it never holds the message:
//! its state is a few counters and a few buffers with hard caps ([`FIELD_CAP`],
//! [`BOUNDARY_CAP`], [`MAX_MIME_DEPTH`]) that grow a few times per message at most, never per
//! byte or per line. Body lines cost one SIMD search for `\n--` and one reverse search per
//! `max_body_line_length` bytes; only header blocks and `--` lines are read line by line.
//!
//! What it follows:
//! - the top-level header block (RFC 5322): physical lines, folding, field names, up to the
//!   first empty line;
//! - the MIME tree (RFC 2045/2046): `multipart/*` boundaries on a stack, each part's header
//!   block, and the header block of a `message/rfc822` (or `message/global`) part that is not
//!   base64 or quoted-printable encoded (a forwarded message's attachments are attachments);
//! - in every header block: `Content-Type` (`boundary`, `name`), `Content-Disposition`
//!   (`filename`), and `Content-Transfer-Encoding`. Parameter values may be quoted or not, in
//!   any order, folded, RFC 2231 (`filename*=utf-8''na%C3%AFve.exe`, `filename*0*=`...) or
//!   RFC 2047 encoded-words (`=?UTF-8?B?...?=`, `=?iso-8859-1?Q?...?=`), decoded to UTF-8 for
//!   utf-8 and latin-1 (other charsets keep their bytes).
//!
//! Definitions, so that limits can be set exactly:
//! - A line ends at LF; a CR right before the LF is not counted. With [`Framing::Data`], one
//!   leading dot of each line is dot-stuffing and is not counted or matched either.
//! - Header size: the bytes before the body, counted as every line of the top-level header
//!   block plus two for its line ending, the empty line that ends the block included (so
//!   `Subject: x\r\n\r\n` is 14). Header line length, header size and denied headers apply to
//!   the top-level block only; every later line (part headers and boundaries included) is a
//!   body line.
//! - A boundary line is `--boundary` or `--boundary--` followed only by spaces or tabs
//!   (RFC 2046, as Python's `email` and Thunderbird read it), checked against every open
//!   multipart, innermost first; an outer boundary closes the inner ones.
//! - Every file name variant of a part is checked: each `filename` and `name` parameter of
//!   `Content-Disposition` and of `Content-Type` (whichever field), and the RFC 2231 form of
//!   each, since mail readers differ on which one wins. A file name's length
//!   is counted in characters (UTF-8 lead bytes) after decoding and trimming quotes and spaces.
//! - A quoted parameter followed by junk before the `;` (`filename="a.txt" .exe`) is read as
//!   the quoted text plus the junk, which is what a reader that does not unquote would see.
//! - [`Rule::MimeStructure`] reports what the scanner will not follow: multiparts nested
//!   deeper than `max_mime_depth` (at most [`MAX_MIME_DEPTH`]), a boundary longer than
//!   [`BOUNDARY_CAP`], or a MIME field longer than [`FIELD_CAP`]. With the rule off, such a
//!   multipart is read as opaque data of its parent, and such a field only up to the cap: the
//!   file names beyond go unchecked. A policy that checks names should refuse on this rule.
//! - Not followed: uuencoded blocks in text bodies, archives, and attachments inside encoded
//!   `message/rfc822` parts.
//!
//! ```
//! use std::sync::Arc;
//! use mailguard::proto::content::{ContentRules, ContentScanner, Framing, Rule};
//!
//! let rules = ContentRules {
//!     deny_filename_extensions: vec!["exe".into()],
//!     max_body_line_length: 998,
//!     ..ContentRules::default()
//! };
//! let rules = Arc::new(rules.compile().expect("valid rules"));
//! let mut scanner = ContentScanner::new(rules, Framing::Data);
//! let mut findings = Vec::new();
//! let message = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\
//!     Content-Disposition: attachment;\r\n filename*=utf-8''na%C3%AFve.EXE\r\n\r\nMZ\r\n--b--\r\n";
//! for chunk in message.chunks(7) {
//!     scanner.feed(chunk, &mut |finding| findings.push(finding));
//! }
//! scanner.finish(&mut |finding| findings.push(finding));
//! assert_eq!(findings.len(), 1);
//! assert_eq!(findings[0].rule, Rule::FilenameExtension);
//! assert_eq!(findings[0].detail, r"na\xC3\xAFve.EXE");
//! ```

use std::sync::Arc;

use aho_corasick::{AhoCorasick, Anchored, Input, MatchKind, StartKind};
use memchr::{memchr, memchr2, memmem, memrchr, memrchr_iter};

/// Multipart levels followed at most; deeper ones are [`Rule::MimeStructure`] or opaque.
pub const MAX_MIME_DEPTH: usize = 16;
/// Bytes kept of a parsed field (`Content-Type`, `Content-Disposition`,
/// `Content-Transfer-Encoding`), unfolded; the rest is [`Rule::MimeStructure`] or ignored.
pub const FIELD_CAP: usize = 8 * 1024;
/// The longest boundary followed (RFC 2046 allows 70).
pub const BOUNDARY_CAP: usize = 200;
/// Bytes kept of a header field name: no real name comes close, and denied names longer than
/// this never match.
const NAME_CAP: usize = 128;
/// Bytes kept of a line that may be a boundary line: `--`, the boundary, `--`, some padding.
const HEAD_CAP: usize = BOUNDARY_CAP + 16;
/// RFC 2231 sections kept per parameter.
const SECTION_CAP: usize = 64;
/// Characters of a [`Finding::detail`].
const DETAIL_CAP: usize = 64;
/// The transfer encodings of RFC 2045; ASA's `others` is anything else.
const KNOWN_ENCODINGS: [&[u8]; 5] = [b"7bit", b"8bit", b"binary", b"base64", b"quoted-printable"];

/// The content rules, as plain values; `0` or empty turns a rule off.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContentRules {
    /// Bytes of the top-level header block, its ending empty line included.
    pub max_header_size: usize,
    /// Bytes of one physical top-level header line, without its line ending (ASA: 998).
    pub max_header_line_length: usize,
    /// Header field names that must not appear at the top level, any case
    /// (e.g. `X-Link2State`).
    pub deny_headers: Vec<String>,
    /// Attachment file extensions, any case, matched as whole extensions at the end of the
    /// decoded name, trailing dots and spaces ignored (`exe` denies `a.EXE` and `a.exe.`, not
    /// `a.exes` nor `exe.txt`). A leading `.` or `*.` is ignored; `tar.gz` works too.
    pub deny_filename_extensions: Vec<String>,
    /// Characters of a decoded attachment file name (ASA: 255).
    pub max_filename_length: usize,
    /// `Content-Transfer-Encoding` values, any case; `others` means any value outside 7bit,
    /// 8bit, binary, base64 and quoted-printable (ASA's list).
    pub deny_encodings: Vec<String>,
    /// Bytes of any line after the top-level header block, without its line ending
    /// (ASA logs over 998).
    pub max_body_line_length: usize,
    /// Multipart nesting allowed; deeper is [`Rule::MimeStructure`]. Values over
    /// [`MAX_MIME_DEPTH`] count as that. `0` turns the rule off (deeper parts go unread).
    pub max_mime_depth: usize,
}

impl ContentRules {
    /// Builds the matchers once, for every message to share.
    pub fn compile(self) -> Result<CompiledRules, RulesError> {
        CompiledRules::new(self)
    }
}

/// Why rules could not be compiled.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("deny_filename_extensions: {0}")]
    Extensions(#[from] aho_corasick::BuildError),
}

/// [`ContentRules`] with their matchers built; shared by all scanners.
#[derive(Debug)]
pub struct CompiledRules {
    rules: ContentRules,
    enabled: u16,
    /// One anchored automaton over every denied extension: it is run on the text after a dot
    /// and must match all of it.
    extensions: Option<AhoCorasick>,
    deny_headers: Vec<Box<[u8]>>,
    deny_encodings: Vec<Box<[u8]>>,
    deny_other_encodings: bool,
    /// The start of a line that may be a boundary line.
    dash_line: memmem::Finder<'static>,
}

impl CompiledRules {
    /// Whether any rule besides the structure check is on: with none, a message need not be
    /// inspected at all.
    pub fn any_enabled(&self) -> bool {
        self.enabled & !Rule::MimeStructure.bit() != 0
    }

    pub fn new(rules: ContentRules) -> Result<Self, RulesError> {
        let patterns: Vec<String> = rules
            .deny_filename_extensions
            .iter()
            .map(|ext| ext.trim().trim_start_matches('*').trim_start_matches('.'))
            .filter(|ext| !ext.is_empty())
            .map(str::to_ascii_lowercase)
            .collect();
        let extensions = if patterns.is_empty() {
            None
        } else {
            let automaton = AhoCorasick::builder()
                .ascii_case_insensitive(true)
                .match_kind(MatchKind::LeftmostLongest)
                .start_kind(StartKind::Anchored)
                .build(&patterns)?;
            Some(automaton)
        };
        let lowered = |list: &[String]| -> Vec<Box<[u8]>> {
            list.iter()
                .map(|s| {
                    s.trim()
                        .to_ascii_lowercase()
                        .into_bytes()
                        .into_boxed_slice()
                })
                .filter(|s| !s.is_empty())
                .collect()
        };
        let deny_headers = lowered(&rules.deny_headers);
        let mut deny_encodings = lowered(&rules.deny_encodings);
        let deny_other_encodings = deny_encodings.iter().any(|e| &**e == b"others");
        deny_encodings.retain(|e| &**e != b"others");
        let on = [
            (Rule::HeaderSize, rules.max_header_size > 0),
            (Rule::HeaderLineLength, rules.max_header_line_length > 0),
            (Rule::DenyHeader, !deny_headers.is_empty()),
            (Rule::FilenameExtension, extensions.is_some()),
            (Rule::FilenameLength, rules.max_filename_length > 0),
            (
                Rule::Encoding,
                deny_other_encodings || !deny_encodings.is_empty(),
            ),
            (Rule::BodyLineLength, rules.max_body_line_length > 0),
            (Rule::MimeStructure, rules.max_mime_depth > 0),
        ];
        let enabled = on
            .iter()
            .filter(|(_, on)| *on)
            .fold(0, |bits, (rule, _)| bits | rule.bit());
        Ok(Self {
            rules,
            enabled,
            extensions,
            deny_headers,
            deny_encodings,
            deny_other_encodings,
            dash_line: memmem::Finder::new(b"\n--").into_owned(),
        })
    }

    /// The rules as given.
    pub fn rules(&self) -> &ContentRules {
        &self.rules
    }

    /// Whether any rule is on (if not, scanning is a no-op).
    pub fn any(&self) -> bool {
        self.enabled != 0
    }

    fn is_on(&self, rule: Rule) -> bool {
        self.enabled & rule.bit() != 0
    }

    fn denies_header(&self, name: &[u8]) -> bool {
        self.deny_headers
            .iter()
            .any(|d| d.eq_ignore_ascii_case(name))
    }

    fn denies_encoding(&self, token: &[u8]) -> bool {
        self.deny_encodings
            .iter()
            .any(|d| d.eq_ignore_ascii_case(token))
            || (self.deny_other_encodings
                && !KNOWN_ENCODINGS
                    .iter()
                    .any(|k| k.eq_ignore_ascii_case(token)))
    }

    /// Whether `name` (decoded, trimmed) ends in a denied extension, as Windows would read it
    /// (trailing dots and spaces dropped), or would once cut at a NUL by a C reader.
    fn denies_extension(&self, name: &[u8]) -> bool {
        let Some(automaton) = &self.extensions else {
            return false;
        };
        let before_nul = memchr(0, name).map(|nul| &name[..nul]);
        std::iter::once(name)
            .chain(before_nul)
            .any(|name| ends_in_denied(automaton, name))
    }
}

fn ends_in_denied(automaton: &AhoCorasick, name: &[u8]) -> bool {
    let end = name
        .iter()
        .rposition(|&b| b != b'.' && b != b' ')
        .map_or(0, |last| last + 1);
    let stem = &name[..end];
    // Every dot, not only the last, so that patterns like `tar.gz` work; a dot-free pattern
    // can only match all of the text after the last dot.
    memrchr_iter(b'.', stem).any(|dot| {
        let ext = &stem[dot + 1..];
        let input = Input::new(ext).anchored(Anchored::Yes);
        matches!(automaton.try_find(input), Ok(Some(m)) if m.end() == ext.len())
    })
}

/// A content rule; see [`ContentRules`] for each one's limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rule {
    HeaderSize,
    HeaderLineLength,
    DenyHeader,
    FilenameExtension,
    FilenameLength,
    Encoding,
    BodyLineLength,
    /// MIME structure beyond the scanner's caps; see the module documentation.
    MimeStructure,
}

impl Rule {
    pub const ALL: [Rule; 8] = [
        Rule::HeaderSize,
        Rule::HeaderLineLength,
        Rule::DenyHeader,
        Rule::FilenameExtension,
        Rule::FilenameLength,
        Rule::Encoding,
        Rule::BodyLineLength,
        Rule::MimeStructure,
    ];

    fn bit(self) -> u16 {
        1 << self as u16
    }

    /// A stable name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Rule::HeaderSize => "header-size",
            Rule::HeaderLineLength => "header-line-length",
            Rule::DenyHeader => "deny-header",
            Rule::FilenameExtension => "filename-extension",
            Rule::FilenameLength => "filename-length",
            Rule::Encoding => "encoding",
            Rule::BodyLineLength => "body-line-length",
            Rule::MimeStructure => "mime-structure",
        }
    }
}

/// A broken rule. `detail` is at most 64 printable ASCII characters (other bytes as `\xNN`),
/// safe to log and to put in a reply: the header name, the decoded file name, the encoding,
/// or the limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub rule: Rule,
    pub detail: String,
}

/// How the message reaches the scanner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// A DATA body: dot-stuffed, so one leading dot of a line is not content.
    Data,
    /// A BDAT body: the bytes as they are.
    Bdat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// A header block: the message's own, a part's, or an embedded message's.
    Headers,
    /// Lines where only the length and boundaries matter.
    Body,
}

/// Where the current header line is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// No content byte yet (a stuffing dot may have been dropped).
    Start,
    Name,
    Value,
}

/// The header field being read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    /// No field (a line without a colon, or before the first field).
    None,
    Ignored,
    ContentType,
    Disposition,
    Encoding,
}

impl Field {
    fn parsed(self) -> bool {
        matches!(
            self,
            Field::ContentType | Field::Disposition | Field::Encoding
        )
    }

    fn header_name(self) -> &'static str {
        match self {
            Field::ContentType => "Content-Type",
            Field::Disposition => "Content-Disposition",
            Field::Encoding => "Content-Transfer-Encoding",
            Field::None | Field::Ignored => "header",
        }
    }
}

/// What follows a header block.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Nested {
    #[default]
    None,
    /// A multipart whose boundary waits in `ContentScanner::boundary`.
    Multipart,
    /// An embedded message: another header block.
    Message,
}

/// What a header block said about its body.
#[derive(Clone, Copy, Debug, Default)]
struct Block {
    /// Only the first `Content-Type` decides the structure (as in Python's `email`); every
    /// one is checked for names.
    content_type_seen: bool,
    nested: Nested,
    /// A transfer encoding other than 7bit, 8bit or binary: an embedded message is opaque.
    encoded: bool,
}

/// The current physical line.
#[derive(Clone, Copy, Debug, Default)]
struct Line {
    /// Bytes so far, without the stuffing dot and the LF, with any CR.
    len: usize,
    /// A stuffing dot was dropped.
    dot: bool,
    /// The last byte was a CR (which a following LF makes part of the line ending).
    cr: bool,
}

/// The limits, copied out of the shared rules for the per-line checks.
#[derive(Clone, Copy, Debug)]
struct Limits {
    header_size: usize,
    header_line: usize,
    body_line: usize,
    filename: usize,
    depth: usize,
}

/// Inspects one message. See the module documentation.
#[derive(Debug)]
pub struct ContentScanner {
    rules: Arc<CompiledRules>,
    limits: Limits,
    dotted: bool,
    /// Any MIME rule is on, so the MIME fields and the tree are worth following.
    mime: bool,
    fired: u16,
    finished: bool,
    mode: Mode,
    /// The top-level header block has ended.
    top_done: bool,
    header_size: usize,
    line: Line,
    phase: Phase,
    field: Field,
    name: [u8; NAME_CAP],
    /// The field name's length, which may exceed what `name` keeps.
    name_len: usize,
    value: Vec<u8>,
    value_overflow: bool,
    block: Block,
    /// The boundary of the header block's multipart, pushed when the block ends.
    boundary: Vec<u8>,
    /// The start of a line that began with `-` while a multipart is open.
    head: Vec<u8>,
    head_active: bool,
    /// `head` is full and the line went on with more than padding.
    head_junk: bool,
    /// The open multiparts' boundaries, outermost first, end to end; `ends[i]` is where the
    /// boundary of level `i` ends.
    bounds: Vec<u8>,
    ends: [usize; MAX_MIME_DEPTH],
    depth: usize,
    /// Decoding buffers for file names, reused for every name.
    scratch: Vec<u8>,
    decoded: Vec<u8>,
    /// Every file name checked, for the tests' oracles.
    #[cfg(test)]
    names: Vec<Vec<u8>>,
}

impl ContentScanner {
    /// A scanner for one message. Allocates nothing until a buffer is needed.
    pub fn new(rules: Arc<CompiledRules>, framing: Framing) -> Self {
        let r = &rules.rules;
        let limits = Limits {
            header_size: r.max_header_size,
            header_line: r.max_header_line_length,
            body_line: r.max_body_line_length,
            filename: r.max_filename_length,
            depth: match r.max_mime_depth {
                0 => MAX_MIME_DEPTH,
                n => n.min(MAX_MIME_DEPTH),
            },
        };
        let mime = [
            Rule::FilenameExtension,
            Rule::FilenameLength,
            Rule::Encoding,
            Rule::MimeStructure,
        ]
        .iter()
        .any(|&rule| rules.is_on(rule));
        Self {
            rules,
            limits,
            dotted: framing == Framing::Data,
            mime,
            fired: 0,
            finished: false,
            mode: Mode::Headers,
            top_done: false,
            header_size: 0,
            line: Line::default(),
            phase: Phase::Start,
            field: Field::None,
            name: [0; NAME_CAP],
            name_len: 0,
            value: Vec::new(),
            value_overflow: false,
            block: Block::default(),
            boundary: Vec::new(),
            head: Vec::new(),
            head_active: false,
            head_junk: false,
            bounds: Vec::new(),
            ends: [0; MAX_MIME_DEPTH],
            depth: 0,
            scratch: Vec::new(),
            decoded: Vec::new(),
            #[cfg(test)]
            names: Vec::new(),
        }
    }

    /// Feeds the next bytes of the message, exactly as they go to the upstream (a DATA
    /// terminator line may be included: it reads as an empty line). Calls `on_finding` once
    /// for each rule broken, as soon as it is certain.
    pub fn feed(&mut self, bytes: &[u8], on_finding: &mut impl FnMut(Finding)) {
        let mut pos = 0;
        // Each call consumes at least one byte or changes the mode at a line end it consumed.
        while pos < bytes.len() && self.needs_input() {
            pos = match self.mode {
                Mode::Headers => self.headers(bytes, pos, on_finding),
                Mode::Body => self.body(bytes, pos, on_finding),
            };
        }
    }

    /// The end of the message: a last line without a line ending is a line, and the last
    /// header field is complete.
    pub fn finish(&mut self, on_finding: &mut impl FnMut(Finding)) {
        if self.needs_input() {
            if self.line.len > 0 || self.line.dot {
                self.line_end(on_finding);
            }
            if self.mode == Mode::Headers {
                self.end_field(on_finding);
            }
        }
        self.finished = true;
    }

    /// Whether more bytes can still break a rule. Once false, the caller may stop feeding.
    pub fn needs_input(&self) -> bool {
        let enabled = self.rules.enabled;
        !self.finished
            && self.fired & enabled != enabled
            // In a body outside any multipart only the line length is left to check.
            && !(self.mode == Mode::Body && self.depth == 0 && self.limits.body_line == 0)
    }

    /// The rules broken so far.
    pub fn broken(&self) -> impl Iterator<Item = Rule> + '_ {
        Rule::ALL
            .into_iter()
            .filter(move |rule| self.fired & rule.bit() != 0)
    }

    fn wants(&self, rule: Rule) -> bool {
        (self.rules.enabled & !self.fired) & rule.bit() != 0
    }

    fn fire(&mut self, rule: Rule, detail: String, sink: &mut impl FnMut(Finding)) {
        self.fired |= rule.bit();
        sink(Finding { rule, detail });
    }

    /// Reads header lines from `pos`; returns where it stopped: the end of `input`, or just
    /// after a line end that left the header block.
    fn headers(&mut self, input: &[u8], mut pos: usize, sink: &mut impl FnMut(Finding)) -> usize {
        while let Some(&byte) = input.get(pos) {
            match self.phase {
                Phase::Start => {
                    if self.dotted && byte == b'.' && !self.line.dot {
                        self.line.dot = true;
                        pos += 1;
                        continue;
                    }
                    match byte {
                        b'\n' => {
                            pos += 1;
                            if self.line_end(sink) {
                                return pos;
                            }
                        }
                        // Folding: the field goes on.
                        b' ' | b'\t' => self.phase = Phase::Value,
                        _ => {
                            // The previous field is complete only now that a line does not
                            // continue it.
                            self.end_field(sink);
                            self.phase = Phase::Name;
                            self.name_len = 0;
                            if byte == b'-' && self.depth > 0 {
                                self.head_start();
                            }
                        }
                    }
                }
                Phase::Name => {
                    let rest = &input[pos..];
                    let stop = memchr2(b':', b'\n', rest);
                    let run = &rest[..stop.unwrap_or(rest.len())];
                    // The name first, so that a line-length finding names what came before.
                    self.append_name(run);
                    self.grow(run, sink);
                    pos += run.len();
                    match stop.map(|at| rest[at]) {
                        Some(b':') => {
                            pos += 1;
                            self.grow(b":", sink);
                            self.name_done(sink);
                        }
                        Some(_) => {
                            pos += 1;
                            if self.line_end(sink) {
                                return pos;
                            }
                        }
                        None => {}
                    }
                }
                Phase::Value => {
                    let rest = &input[pos..];
                    let lf = memchr(b'\n', rest);
                    let run = &rest[..lf.unwrap_or(rest.len())];
                    self.grow(run, sink);
                    if self.field.parsed() {
                        self.append_value(run);
                    }
                    pos += run.len();
                    if lf.is_some() {
                        pos += 1;
                        if self.line_end(sink) {
                            return pos;
                        }
                    }
                }
            }
        }
        pos
    }

    /// Reads body lines from `pos`; returns where it stopped: the end of `input`, or just
    /// after a boundary line.
    fn body(&mut self, input: &[u8], mut pos: usize, sink: &mut impl FnMut(Finding)) -> usize {
        while pos < input.len() {
            let line_started = self.line.len > 0 || self.line.dot;
            if self.head_active || line_started {
                // The rest of a line that began earlier: measured exactly.
                let rest = &input[pos..];
                let Some(lf) = memchr(b'\n', rest) else {
                    self.grow(rest, sink);
                    return input.len();
                };
                self.grow(&rest[..lf], sink);
                pos += lf + 1;
                if self.line_end(sink) {
                    return pos;
                }
                continue;
            }
            let byte = input[pos];
            if self.dotted && byte == b'.' {
                self.line.dot = true;
                pos += 1;
                continue;
            }
            if self.depth > 0 && byte == b'-' {
                self.head_start();
                continue;
            }
            if self.depth == 0 && self.limits.body_line == 0 {
                return input.len();
            }
            // Lines up to the next one that starts with `--` need only their length checked.
            let end = if self.depth > 0 {
                let next = self.rules.dash_line.find(&input[pos..]);
                next.map_or(input.len(), |at| pos + at + 1)
            } else {
                input.len()
            };
            pos = self.plain_lines(&input[..end], pos, sink);
        }
        pos
    }

    /// Checks the lines of `input[pos..]` (`pos` is a line start, and no line after it starts
    /// with `--`) and takes up the unfinished last one. Returns `input.len()`.
    fn plain_lines(
        &mut self,
        input: &[u8],
        mut pos: usize,
        sink: &mut impl FnMut(Finding),
    ) -> usize {
        let limit = self.limits.body_line;
        if limit > 0 {
            while pos < input.len() {
                // Every line that ends within `limit + 1` bytes of `pos` is short enough (its
                // bytes on the wire bound its content), so one reverse search clears them all;
                // only a line that may be too long is measured exactly.
                let window = pos.saturating_add(limit + 1).min(input.len());
                if let Some(lf) = memrchr(b'\n', &input[pos..window]) {
                    pos += lf + 1;
                    continue;
                }
                if window == input.len() {
                    break;
                }
                let Some(lf) = memchr(b'\n', &input[window..]) else {
                    break;
                };
                let end = window + lf;
                self.check_body_line(&input[pos..end], sink);
                pos = end + 1;
            }
        } else if let Some(lf) = memrchr(b'\n', &input[pos..]) {
            pos += lf + 1;
        }
        let tail = &input[pos..];
        match tail.first() {
            None => {}
            Some(b'.') if self.dotted => {
                self.line.dot = true;
                self.grow(&tail[1..], sink);
            }
            Some(b'-') if self.depth > 0 => {
                // A lone `-` at the end of the input: `--boundary` may follow.
                self.head_start();
                self.grow(tail, sink);
            }
            Some(_) => self.grow(tail, sink),
        }
        input.len()
    }

    /// A whole body line, `line` without its LF, with any stuffing dot.
    fn check_body_line(&mut self, line: &[u8], sink: &mut impl FnMut(Finding)) {
        let dot = usize::from(self.dotted && line.first() == Some(&b'.'));
        let cr = usize::from(line.last() == Some(&b'\r') && line.len() > dot);
        let limit = self.limits.body_line;
        if line.len() - dot - cr > limit && self.wants(Rule::BodyLineLength) {
            self.fire(Rule::BodyLineLength, format!("over {limit} bytes"), sink);
        }
    }

    /// Adds a run of the current line (no LF in it) and reports a line or header block that
    /// is already certain to be too long, wherever the run ends.
    fn grow(&mut self, run: &[u8], sink: &mut impl FnMut(Finding)) {
        let Some(&last) = run.last() else {
            return;
        };
        self.line.len = self.line.len.saturating_add(run.len());
        self.line.cr = last == b'\r';
        if self.head_active {
            self.capture(run);
        }
        let len = self.line.len;
        // A line of `limit + 2` bytes is too long even if its last byte is the CR of CRLF.
        if self.top_done {
            let limit = self.limits.body_line;
            if limit > 0 && len >= limit.saturating_add(2) && self.wants(Rule::BodyLineLength) {
                self.fire(Rule::BodyLineLength, format!("over {limit} bytes"), sink);
            }
            return;
        }
        let line_at = match self.limits.header_line {
            0 => usize::MAX,
            limit => limit.saturating_add(2),
        };
        // The line adds at least `len + 1` to the block (its content and a line ending).
        let size_at = match self.limits.header_size {
            0 => usize::MAX,
            max => max.saturating_sub(self.header_size).max(1),
        };
        // Both thresholds are on the same count: report them in the order they are crossed.
        if size_at < line_at {
            self.header_size_crossed(len >= size_at, sink);
            self.header_line_crossed(len >= line_at, line_at, sink);
        } else {
            self.header_line_crossed(len >= line_at, line_at, sink);
            self.header_size_crossed(len >= size_at, sink);
        }
    }

    fn header_size_crossed(&mut self, crossed: bool, sink: &mut impl FnMut(Finding)) {
        if crossed && self.wants(Rule::HeaderSize) {
            let max = self.limits.header_size;
            self.fire(Rule::HeaderSize, format!("over {max} bytes"), sink);
        }
    }

    /// `at` is the line length where the line became too long: the detail names the field as
    /// far as it had been read there, whatever the split.
    fn header_line_crossed(&mut self, crossed: bool, at: usize, sink: &mut impl FnMut(Finding)) {
        if crossed && self.wants(Rule::HeaderLineLength) {
            let detail = self.line_detail(at);
            self.fire(Rule::HeaderLineLength, detail, sink);
        }
    }

    fn line_detail(&self, at: usize) -> String {
        let name_end = if self.phase == Phase::Name {
            self.name_len.min(at)
        } else {
            self.name_len
        };
        let name = &self.name[..name_end.min(NAME_CAP)];
        if name.is_empty() {
            format!("over {} bytes", self.limits.header_line)
        } else {
            escape(name)
        }
    }

    /// The LF of the current line. Returns whether the mode changed (a header block ended,
    /// or a boundary line was read).
    fn line_end(&mut self, sink: &mut impl FnMut(Finding)) -> bool {
        let content = self.line.len - usize::from(self.line.cr);
        if self.top_done {
            let limit = self.limits.body_line;
            if limit > 0 && content > limit && self.wants(Rule::BodyLineLength) {
                self.fire(Rule::BodyLineLength, format!("over {limit} bytes"), sink);
            }
        } else {
            let limit = self.limits.header_line;
            if limit > 0 && content > limit && self.wants(Rule::HeaderLineLength) {
                let detail = self.line_detail(usize::MAX);
                self.fire(Rule::HeaderLineLength, detail, sink);
            }
            self.header_size = self.header_size.saturating_add(content + 2);
            let max = self.limits.header_size;
            self.header_size_crossed(max > 0 && self.header_size > max, sink);
        }
        let boundary = if self.head_active {
            self.boundary_match()
        } else {
            None
        };
        self.line = Line::default();
        self.head_active = false;
        if let Some((level, close)) = boundary {
            self.enter_boundary(level, close);
            return true;
        }
        if self.mode == Mode::Headers {
            self.phase = Phase::Start;
            if content == 0 {
                self.block_end(sink);
                return true;
            }
        }
        false
    }

    fn append_name(&mut self, run: &[u8]) {
        if let Some(room) = self.name.get_mut(self.name_len..) {
            let n = room.len().min(run.len());
            room[..n].copy_from_slice(&run[..n]);
        }
        self.name_len = self.name_len.saturating_add(run.len());
    }

    /// The colon after a field name.
    fn name_done(&mut self, sink: &mut impl FnMut(Finding)) {
        self.phase = Phase::Value;
        self.field = Field::Ignored;
        if self.name_len > NAME_CAP {
            return;
        }
        let name = trim_end(&self.name[..self.name_len]);
        if !self.top_done && self.wants(Rule::DenyHeader) && self.rules.denies_header(name) {
            let detail = escape(name);
            self.fire(Rule::DenyHeader, detail, sink);
        }
        if self.mime {
            let name = trim_end(&self.name[..self.name_len]);
            self.field = if name.eq_ignore_ascii_case(b"content-type") {
                Field::ContentType
            } else if name.eq_ignore_ascii_case(b"content-disposition") {
                Field::Disposition
            } else if name.eq_ignore_ascii_case(b"content-transfer-encoding") {
                Field::Encoding
            } else {
                Field::Ignored
            };
        }
    }

    /// Unfolded value bytes of a parsed field. CRs are dropped: unfolding removes CRLF, and a
    /// bare CR has no meaning in a value.
    fn append_value(&mut self, run: &[u8]) {
        // Nearly always the only CR is the one before the LF.
        let run = run.strip_suffix(b"\r").unwrap_or(run);
        if memchr(b'\r', run).is_none() {
            let room = FIELD_CAP - self.value.len();
            self.value.extend_from_slice(&run[..run.len().min(room)]);
            self.value_overflow |= run.len() > room;
            return;
        }
        for piece in run.split(|&b| b == b'\r') {
            let room = FIELD_CAP - self.value.len();
            if piece.len() > room {
                self.value.extend_from_slice(&piece[..room]);
                self.value_overflow = true;
                return;
            }
            self.value.extend_from_slice(piece);
        }
    }

    /// A field ended: parse it if it is one of ours.
    fn end_field(&mut self, sink: &mut impl FnMut(Finding)) {
        let field = std::mem::replace(&mut self.field, Field::None);
        if !field.parsed() {
            return;
        }
        if self.value_overflow && self.wants(Rule::MimeStructure) {
            let detail = format!("{} over {FIELD_CAP} bytes", field.header_name());
            self.fire(Rule::MimeStructure, detail, sink);
        }
        let value = std::mem::take(&mut self.value);
        match field {
            Field::ContentType => self.content_type(&value, sink),
            Field::Disposition => self.file_names(&value, sink),
            Field::Encoding => self.transfer_encoding(&value, sink),
            Field::None | Field::Ignored => {}
        }
        self.value = value;
        self.value.clear();
        self.value_overflow = false;
    }

    /// The empty line that ends a header block.
    fn block_end(&mut self, sink: &mut impl FnMut(Finding)) {
        self.end_field(sink);
        self.top_done = true;
        let block = std::mem::take(&mut self.block);
        self.mode = Mode::Body;
        match block.nested {
            Nested::Multipart => self.push_boundary(sink),
            Nested::Message if !block.encoded => self.mode = Mode::Headers,
            Nested::Message | Nested::None => {}
        }
    }

    fn push_boundary(&mut self, sink: &mut impl FnMut(Finding)) {
        if self.depth >= self.limits.depth {
            if self.wants(Rule::MimeStructure) {
                let detail = format!("multipart nested deeper than {}", self.limits.depth);
                self.fire(Rule::MimeStructure, detail, sink);
            }
            // Not followed: the multipart is opaque data of its parent part.
            return;
        }
        self.bounds.extend_from_slice(&self.boundary);
        self.ends[self.depth] = self.bounds.len();
        self.depth += 1;
    }

    fn bound(&self, level: usize) -> &[u8] {
        let start = if level == 0 { 0 } else { self.ends[level - 1] };
        &self.bounds[start..self.ends[level]]
    }

    fn head_start(&mut self) {
        self.head_active = true;
        self.head_junk = false;
        self.head.clear();
    }

    fn capture(&mut self, run: &[u8]) {
        let room = HEAD_CAP.saturating_sub(self.head.len());
        let (kept, over) = run.split_at(room.min(run.len()));
        self.head.extend_from_slice(kept);
        if !self.head_junk && over.iter().any(|&b| !matches!(b, b' ' | b'\t' | b'\r')) {
            self.head_junk = true;
        }
    }

    /// The level and kind (close or not) of the boundary line in `head`, if it is one.
    fn boundary_match(&self) -> Option<(usize, bool)> {
        if self.head_junk {
            return None;
        }
        let line = trim_end(&self.head);
        let rest = line.strip_prefix(b"--")?;
        (0..self.depth)
            .rev()
            .find_map(|level| match rest.strip_prefix(self.bound(level))? {
                b"" => Some((level, false)),
                b"--" => Some((level, true)),
                _ => None,
            })
    }

    fn enter_boundary(&mut self, level: usize, close: bool) {
        // An outer boundary closes the inner multiparts too.
        self.depth = if close { level } else { level + 1 };
        let keep = if self.depth == 0 {
            0
        } else {
            self.ends[self.depth - 1]
        };
        self.bounds.truncate(keep);
        self.field = Field::None;
        self.value.clear();
        self.value_overflow = false;
        self.block = Block::default();
        self.phase = Phase::Start;
        self.mode = if close { Mode::Body } else { Mode::Headers };
    }

    fn content_type(&mut self, value: &[u8], sink: &mut impl FnMut(Finding)) {
        if !self.block.content_type_seen {
            self.block.content_type_seen = true;
            let (kind, subtype) = media_type(value);
            if kind.eq_ignore_ascii_case(b"multipart") {
                if self.take_boundary(value, sink) {
                    self.block.nested = Nested::Multipart;
                }
            } else if kind.eq_ignore_ascii_case(b"message")
                && (subtype.eq_ignore_ascii_case(b"rfc822")
                    || subtype.eq_ignore_ascii_case(b"global"))
            {
                self.block.nested = Nested::Message;
            }
        }
        self.file_names(value, sink);
    }

    /// The `boundary` parameter into `self.boundary`: the first plain one, else the RFC 2231
    /// form (Python's `email` writes `boundary*0*=` when it folds).
    fn take_boundary(&mut self, value: &[u8], sink: &mut impl FnMut(Finding)) -> bool {
        let mut out = std::mem::take(&mut self.boundary);
        out.clear();
        let plain = params(value).find(|p| p.name.eq_ignore_ascii_case(b"boundary"));
        let found = match plain {
            Some(param) => {
                unquote(&param, &mut out);
                true
            }
            None => rfc2231(value, b"boundary", &mut out).is_some(),
        };
        let len = trim_end(&out).len();
        out.truncate(len);
        let ok = found && !out.is_empty() && out.len() <= BOUNDARY_CAP;
        if found && out.len() > BOUNDARY_CAP && self.wants(Rule::MimeStructure) {
            let detail = format!("boundary over {BOUNDARY_CAP} bytes");
            self.fire(Rule::MimeStructure, detail, sink);
        }
        self.boundary = out;
        ok
    }

    /// Checks every file name in a `Content-Type` or `Content-Disposition` value: `filename`
    /// and `name` in either field (mailers mix them up and readers accept both), each plain
    /// one and the RFC 2231 form of each.
    fn file_names(&mut self, value: &[u8], sink: &mut impl FnMut(Finding)) {
        let checked = self.wants(Rule::FilenameExtension) || self.wants(Rule::FilenameLength);
        if !checked && !cfg!(test) {
            return;
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut decoded = std::mem::take(&mut self.decoded);
        let named = |p: &Param<'_>| {
            p.name.eq_ignore_ascii_case(b"filename") || p.name.eq_ignore_ascii_case(b"name")
        };
        for param in params(value).filter(named) {
            scratch.clear();
            unquote(&param, &mut scratch);
            decoded.clear();
            decode_words(&scratch, &mut decoded);
            self.check_name(&decoded, sink);
        }
        for base in [&b"filename"[..], b"name"] {
            scratch.clear();
            if let Some(charset) = rfc2231(value, base, &mut scratch) {
                decoded.clear();
                for &byte in &scratch {
                    push_char(&mut decoded, charset, byte);
                }
                self.check_name(&decoded, sink);
            }
        }
        self.scratch = scratch;
        self.decoded = decoded;
    }

    fn check_name(&mut self, decoded: &[u8], sink: &mut impl FnMut(Finding)) {
        let name = trim_name(decoded);
        if name.is_empty() {
            return;
        }
        #[cfg(test)]
        self.names.push(name.to_vec());
        let max = self.limits.filename;
        if max > 0 && self.wants(Rule::FilenameLength) && char_count(name) > max {
            self.fire(Rule::FilenameLength, escape(name), sink);
        }
        if self.wants(Rule::FilenameExtension) && self.rules.denies_extension(name) {
            self.fire(Rule::FilenameExtension, escape(name), sink);
        }
    }

    fn transfer_encoding(&mut self, value: &[u8], sink: &mut impl FnMut(Finding)) {
        let token = first_token(value);
        if token.is_empty() {
            return;
        }
        if ![&b"7bit"[..], b"8bit", b"binary"]
            .iter()
            .any(|identity| identity.eq_ignore_ascii_case(token))
        {
            self.block.encoded = true;
        }
        if self.wants(Rule::Encoding) && self.rules.denies_encoding(token) {
            self.fire(Rule::Encoding, escape(token), sink);
        }
    }
}

fn is_space(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\r' | b'\n')
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|&b| !is_space(b))
        .unwrap_or(bytes.len());
    trim_end(&bytes[start..])
}

fn trim_end(bytes: &[u8]) -> &[u8] {
    let end = bytes
        .iter()
        .rposition(|&b| !is_space(b))
        .map_or(0, |i| i + 1);
    &bytes[..end]
}

/// A file name without the quotes and spaces around it.
fn trim_name(bytes: &[u8]) -> &[u8] {
    let keep = |b: &u8| !is_space(*b) && *b != b'"';
    let start = bytes.iter().position(keep).unwrap_or(bytes.len());
    let end = bytes.iter().rposition(keep).map_or(start, |i| i + 1);
    &bytes[start..end]
}

/// Characters of (mostly) UTF-8 text: bytes that are not continuation bytes.
fn char_count(bytes: &[u8]) -> usize {
    bytes.iter().filter(|&&b| b & 0xC0 != 0x80).count()
}

/// `type` and `subtype` of a `Content-Type` value.
fn media_type(value: &[u8]) -> (&[u8], &[u8]) {
    let main = &value[..memchr(b';', value).unwrap_or(value.len())];
    let main = trim(main);
    let (kind, subtype) = match memchr(b'/', main) {
        Some(slash) => (&main[..slash], &main[slash + 1..]),
        None => (main, &b""[..]),
    };
    (trim(kind), first_token(subtype))
}

/// The first token of a value: up to a space, `;` or a comment.
fn first_token(value: &[u8]) -> &[u8] {
    let value = trim(value);
    let end = value
        .iter()
        .position(|&b| is_space(b) || b == b';' || b == b'(')
        .unwrap_or(value.len());
    &value[..end]
}

/// One `name=value` parameter. A quoted value is kept with its escapes; `junk` is what
/// follows its closing quote before the next `;`.
#[derive(Clone, Copy, Debug, Default)]
struct Param<'a> {
    name: &'a [u8],
    value: &'a [u8],
    quoted: bool,
    junk: &'a [u8],
}

/// The parameters of a field value, after its first token; `;` inside quotes does not
/// split. The `;` after the first token may be missing (`attachment filename=a.exe`): some
/// readers still find the parameter, so the scanner does too.
struct Params<'a> {
    text: &'a [u8],
    pos: usize,
}

fn params(text: &[u8]) -> Params<'_> {
    let start = text
        .iter()
        .position(|&b| !is_space(b))
        .unwrap_or(text.len());
    let pos = text[start..]
        .iter()
        .position(|&b| is_space(b) || b == b';')
        .map_or(text.len(), |end| start + end);
    Params { text, pos }
}

impl<'a> Iterator for Params<'a> {
    type Item = Param<'a>;

    fn next(&mut self) -> Option<Param<'a>> {
        let text = self.text;
        loop {
            while text
                .get(self.pos)
                .is_some_and(|&b| b == b';' || is_space(b))
            {
                self.pos += 1;
            }
            if self.pos >= text.len() {
                return None;
            }
            let start = self.pos;
            let stop = text[start..]
                .iter()
                .position(|&b| b == b'=' || b == b';')
                .map_or(text.len(), |i| start + i);
            self.pos = stop;
            if text.get(stop) != Some(&b'=') {
                // A parameter without a value.
                continue;
            }
            let name = trim(&text[start..stop]);
            let mut at = stop + 1;
            while text.get(at).is_some_and(|&b| is_space(b)) {
                at += 1;
            }
            let semicolon =
                |from: usize| memchr(b';', &text[from..]).map_or(text.len(), |i| from + i);
            if text.get(at) == Some(&b'"') {
                let open = at + 1;
                let close = closing_quote(text, open);
                let after = (close + 1).min(text.len());
                let end = semicolon(after);
                self.pos = end;
                return Some(Param {
                    name,
                    value: &text[open..close],
                    quoted: true,
                    junk: trim(&text[after..end]),
                });
            }
            let end = semicolon(at);
            self.pos = end;
            return Some(Param {
                name,
                value: trim(&text[at..end]),
                quoted: false,
                junk: b"",
            });
        }
    }
}

/// The index of the quote that closes a quoted string opened before `open`, or the end.
fn closing_quote(text: &[u8], open: usize) -> usize {
    let mut i = open;
    while let Some(&byte) = text.get(i) {
        match byte {
            b'\\' => i += 2,
            b'"' => return i,
            _ => i += 1,
        }
    }
    text.len()
}

/// Appends a parameter's text: escapes resolved, junk after the closing quote kept.
fn unquote(param: &Param<'_>, out: &mut Vec<u8>) {
    if !param.quoted {
        out.extend_from_slice(param.value);
        return;
    }
    let mut bytes = param.value.iter();
    while let Some(&byte) = bytes.next() {
        let byte = if byte == b'\\' {
            match bytes.next() {
                Some(&escaped) => escaped,
                None => break,
            }
        } else {
            byte
        };
        out.push(byte);
    }
    out.extend_from_slice(param.junk);
}

/// An RFC 2231 section of parameter `base`: `base*` (one extended value) or `base*N` /
/// `base*N*`. Returns the section number and whether it is percent-encoded.
fn section(name: &[u8], base: &[u8]) -> Option<(u16, bool)> {
    let head = name.get(..base.len())?;
    if !head.eq_ignore_ascii_case(base) {
        return None;
    }
    let rest = name[base.len()..].strip_prefix(b"*")?;
    if rest.is_empty() {
        return Some((0, true));
    }
    let (digits, extended) = match rest.strip_suffix(b"*") {
        Some(digits) => (digits, true),
        None => (rest, false),
    };
    if digits.is_empty() || digits.len() > 4 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let index = digits
        .iter()
        .fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    Some((index, extended))
}

#[derive(Clone, Copy, Debug, Default)]
struct Section<'a> {
    index: u16,
    order: u16,
    extended: bool,
    param: Param<'a>,
}

/// Assembles the RFC 2231 form of parameter `base` into `out` (sections in number order,
/// the first of each number kept, percent-decoded), and returns its charset, or `None` if
/// the value has no such parameter.
fn rfc2231(value: &[u8], base: &[u8], out: &mut Vec<u8>) -> Option<Charset> {
    // Nearly no value has a section; this keeps them from paying for the array below.
    memchr(b'*', value)?;
    let mut sections = [Section::default(); SECTION_CAP];
    let mut count = 0;
    for param in params(value) {
        if count == SECTION_CAP {
            break;
        }
        if let Some((index, extended)) = section(param.name, base) {
            sections[count] = Section {
                index,
                order: count as u16,
                extended,
                param,
            };
            count += 1;
        }
    }
    let sections = &mut sections[..count];
    if sections.is_empty() {
        return None;
    }
    // In place, so that nothing is allocated.
    sections.sort_unstable_by_key(|s| (s.index, s.order));
    let mut charset = Charset::Bytes;
    let mut previous = None;
    for (i, s) in sections.iter().enumerate() {
        if previous == Some(s.index) {
            continue;
        }
        previous = Some(s.index);
        let start = out.len();
        unquote(&s.param, out);
        if !s.extended {
            continue;
        }
        if i == 0 && s.index == 0 {
            // `charset'language'text`; without both quotes the text has no charset.
            if let Some(first) = memchr(b'\'', &out[start..]) {
                if let Some(second) = memchr(b'\'', &out[start + first + 1..]) {
                    charset = Charset::of(&out[start..start + first]);
                    out.drain(start..start + first + second + 2);
                }
            }
        }
        percent_decode_from(out, start);
    }
    Some(charset)
}

/// Decodes `%XX` in `buf[start..]` in place (the text only shrinks).
fn percent_decode_from(buf: &mut Vec<u8>, start: usize) {
    let mut read = start;
    let mut write = start;
    while read < buf.len() {
        let byte = buf[read];
        let pair = (buf.get(read + 1).copied(), buf.get(read + 2).copied());
        let decoded = match (byte, pair) {
            (b'%', (Some(high), Some(low))) => hex(high).zip(hex(low)),
            _ => None,
        };
        match decoded {
            Some((high, low)) => {
                buf[write] = high << 4 | low;
                read += 3;
            }
            None => {
                buf[write] = byte;
                read += 1;
            }
        }
        write += 1;
    }
    buf.truncate(write);
}

fn hex(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// How a name's bytes become UTF-8.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Charset {
    /// UTF-8, ASCII, or a charset we do not convert: the bytes are kept.
    Bytes,
    /// ISO-8859-1 (and windows-1252, whose extra characters are rare in names).
    Latin1,
}

impl Charset {
    fn of(name: &[u8]) -> Charset {
        // RFC 2231 section 5 allows `charset*language` in encoded-words.
        let name = &name[..memchr(b'*', name).unwrap_or(name.len())];
        const LATIN1: [&[u8]; 8] = [
            b"iso-8859-1",
            b"iso8859-1",
            b"iso_8859-1",
            b"latin1",
            b"latin-1",
            b"l1",
            b"windows-1252",
            b"cp1252",
        ];
        if LATIN1.iter().any(|l| l.eq_ignore_ascii_case(name)) {
            Charset::Latin1
        } else {
            Charset::Bytes
        }
    }
}

fn push_char(out: &mut Vec<u8>, charset: Charset, byte: u8) {
    if charset == Charset::Latin1 && byte >= 0x80 {
        out.push(0xC0 | byte >> 6);
        out.push(0x80 | (byte & 0x3F));
    } else {
        out.push(byte);
    }
}

/// Decodes the RFC 2047 encoded-words of `text` into `out`; other text is copied. Space
/// between two encoded-words is dropped (RFC 2047 section 6.2).
fn decode_words(text: &[u8], out: &mut Vec<u8>) {
    let mut i = 0;
    // Where `out` ended after the last encoded-word, while only space has followed it.
    let mut after_word = None;
    while let Some(&byte) = text.get(i) {
        if byte == b'=' && text.get(i + 1) == Some(&b'?') {
            if let Some(word) = encoded_word(&text[i..]) {
                if let Some(mark) = after_word {
                    out.truncate(mark);
                }
                word.decode(out);
                after_word = Some(out.len());
                i += word.len;
                continue;
            }
        }
        out.push(byte);
        if !is_space(byte) {
            after_word = None;
        }
        i += 1;
    }
}

/// `=?charset?B|Q?text?=`.
struct Word<'a> {
    charset: Charset,
    base64: bool,
    text: &'a [u8],
    len: usize,
}

fn encoded_word(s: &[u8]) -> Option<Word<'_>> {
    let body = s.get(2..)?;
    let q1 = memchr(b'?', body)?;
    if q1 == 0 || q1 > 64 {
        return None;
    }
    let base64 = match body.get(q1 + 1)? {
        b'B' | b'b' => true,
        b'Q' | b'q' => false,
        _ => return None,
    };
    if body.get(q1 + 2) != Some(&b'?') {
        return None;
    }
    let text_start = q1 + 3;
    let q3 = text_start + memchr(b'?', body.get(text_start..)?)?;
    if body.get(q3 + 1) != Some(&b'=') {
        return None;
    }
    Some(Word {
        charset: Charset::of(&body[..q1]),
        base64,
        text: &body[text_start..q3],
        len: 2 + q3 + 2,
    })
}

impl Word<'_> {
    fn decode(&self, out: &mut Vec<u8>) {
        if self.base64 {
            // Lenient: characters outside the alphabet are skipped, padding ends the text.
            let mut acc = 0u32;
            let mut bits = 0u32;
            for &c in self.text {
                let v = match c {
                    b'A'..=b'Z' => c - b'A',
                    b'a'..=b'z' => c - b'a' + 26,
                    b'0'..=b'9' => c - b'0' + 52,
                    b'+' => 62,
                    b'/' => 63,
                    b'=' => break,
                    _ => continue,
                };
                acc = (acc << 6 | u32::from(v)) & 0xFFFF;
                bits += 6;
                if bits >= 8 {
                    bits -= 8;
                    push_char(out, self.charset, (acc >> bits) as u8);
                }
            }
            return;
        }
        let mut i = 0;
        while let Some(&c) = self.text.get(i) {
            let byte = match c {
                b'_' => b' ',
                b'=' => {
                    let pair = self.text.get(i + 1).copied().and_then(hex);
                    let low = self.text.get(i + 2).copied().and_then(hex);
                    if let Some((high, low)) = pair.zip(low) {
                        i += 2;
                        high << 4 | low
                    } else {
                        c
                    }
                }
                _ => c,
            };
            push_char(out, self.charset, byte);
            i += 1;
        }
    }
}

/// A detail safe for logs and replies: printable ASCII, other bytes as `\xNN`, a backslash
/// doubled; if longer than 64 characters, its head and its tail (where an extension is).
fn escape(bytes: &[u8]) -> String {
    fn unit(byte: u8) -> usize {
        match byte {
            b'\\' => 2,
            0x20..=0x7E => 1,
            _ => 4,
        }
    }
    fn push(out: &mut String, byte: u8) {
        match byte {
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7E => out.push(char::from(byte)),
            _ => out.push_str(&format!("\\x{byte:02X}")),
        }
    }
    let total: usize = bytes.iter().map(|&b| unit(b)).sum();
    let mut out = String::with_capacity(total.min(DETAIL_CAP));
    if total <= DETAIL_CAP {
        bytes.iter().for_each(|&b| push(&mut out, b));
        return out;
    }
    const HEAD: usize = 44;
    const TAIL: usize = DETAIL_CAP - HEAD - 3;
    let mut width = 0;
    let head = bytes
        .iter()
        .take_while(|&&b| {
            width += unit(b);
            width <= HEAD
        })
        .count();
    let mut width = 0;
    let tail = bytes[head..]
        .iter()
        .rev()
        .take_while(|&&b| {
            width += unit(b);
            width <= TAIL
        })
        .count();
    bytes[..head].iter().for_each(|&b| push(&mut out, b));
    out.push_str("...");
    bytes[bytes.len() - tail..]
        .iter()
        .for_each(|&b| push(&mut out, b));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    /// ASA-like rules, every one on.
    fn asa() -> ContentRules {
        ContentRules {
            max_header_size: 64 * 1024,
            max_header_line_length: 998,
            deny_headers: vec!["X-Link2State".into()],
            deny_filename_extensions: ["exe", "js", "vbs", "scr", "iso"]
                .map(String::from)
                .to_vec(),
            max_filename_length: 255,
            deny_encodings: vec!["binary".into(), "uuencode".into()],
            max_body_line_length: 998,
            max_mime_depth: 16,
        }
    }

    /// Small limits, so that random messages cross them.
    fn small() -> ContentRules {
        ContentRules {
            max_header_size: 120,
            max_header_line_length: 24,
            deny_headers: vec!["X-Bad".into()],
            deny_filename_extensions: vec!["exe".into(), ".tar.gz".into()],
            max_filename_length: 12,
            deny_encodings: vec!["binary".into()],
            max_body_line_length: 30,
            max_mime_depth: 3,
        }
    }

    fn compiled(rules: ContentRules) -> Arc<CompiledRules> {
        Arc::new(rules.compile().expect("rules compile"))
    }

    /// What scanning a message yields: the findings in order and every file name checked.
    #[derive(Debug, PartialEq, Eq)]
    struct Run {
        findings: Vec<Finding>,
        names: Vec<Vec<u8>>,
    }

    impl Run {
        fn rules(&self) -> Vec<Rule> {
            self.findings.iter().map(|f| f.rule).collect()
        }

        fn pairs(&self) -> Vec<(Rule, &str)> {
            self.findings
                .iter()
                .map(|f| (f.rule, f.detail.as_str()))
                .collect()
        }
    }

    /// Scans `msg` cut at `cuts` (offsets, clamped and sorted as they come).
    fn scan_cuts(rules: &Arc<CompiledRules>, framing: Framing, msg: &[u8], cuts: &[usize]) -> Run {
        let mut scanner = ContentScanner::new(Arc::clone(rules), framing);
        let mut findings = Vec::new();
        let mut from = 0;
        for to in cuts.iter().copied().chain(std::iter::once(msg.len())) {
            let to = to.clamp(from, msg.len());
            scanner.feed(&msg[from..to], &mut |f| findings.push(f));
            from = to;
        }
        scanner.finish(&mut |f| findings.push(f));
        let fired: Vec<Rule> = scanner.broken().collect();
        let mut expected: Vec<Rule> = findings.iter().map(|f| f.rule).collect();
        expected.sort_unstable();
        assert_eq!(fired, expected, "broken() vs findings");
        assert!(findings.iter().all(|f| f.detail.len() <= DETAIL_CAP
            && f.detail.bytes().all(|b| (0x20..=0x7E).contains(&b))));
        Run {
            findings,
            names: scanner.names,
        }
    }

    fn whole(rules: &Arc<CompiledRules>, framing: Framing, msg: &[u8]) -> Run {
        scan_cuts(rules, framing, msg, &[])
    }

    fn bytewise(rules: &Arc<CompiledRules>, framing: Framing, msg: &[u8]) -> Run {
        let cuts: Vec<usize> = (1..msg.len()).collect();
        scan_cuts(rules, framing, msg, &cuts)
    }

    /// The message as a DATA body carries it: a dot added to every line starting with one.
    fn stuff(msg: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(msg.len() + 16);
        let mut line_start = true;
        for &b in msg {
            if line_start && b == b'.' {
                out.push(b'.');
            }
            out.push(b);
            line_start = b == b'\n';
        }
        out
    }

    /// Scans `msg` both ways (BDAT as is, DATA stuffed), whole and one byte per call, and
    /// checks that all four agree; returns the result.
    fn scan_all(rules: &Arc<CompiledRules>, msg: &[u8]) -> Run {
        let bdat = whole(rules, Framing::Bdat, msg);
        let data = stuff(msg);
        assert_eq!(whole(rules, Framing::Data, &data), bdat, "DATA vs BDAT");
        assert_eq!(bytewise(rules, Framing::Bdat, msg), bdat, "bytewise BDAT");
        assert_eq!(bytewise(rules, Framing::Data, &data), bdat, "bytewise DATA");
        bdat
    }

    fn check(rules: &Arc<CompiledRules>, msg: &[u8]) -> Vec<(Rule, String)> {
        let run = scan_all(rules, msg);
        run.findings
            .into_iter()
            .map(|f| (f.rule, f.detail))
            .collect()
    }

    fn rules_of(rules: &Arc<CompiledRules>, msg: &[u8]) -> Vec<Rule> {
        scan_all(rules, msg).rules()
    }

    const FIXTURES: [(&str, &[u8]); 12] = [
        (
            "nested.eml",
            include_bytes!("../../tests/fixtures/mime/nested.eml"),
        ),
        (
            "nested_exe.eml",
            include_bytes!("../../tests/fixtures/mime/nested_exe.eml"),
        ),
        (
            "rfc2231.eml",
            include_bytes!("../../tests/fixtures/mime/rfc2231.eml"),
        ),
        (
            "rfc2231_continued.eml",
            include_bytes!("../../tests/fixtures/mime/rfc2231_continued.eml"),
        ),
        (
            "encoded_word_b.eml",
            include_bytes!("../../tests/fixtures/mime/encoded_word_b.eml"),
        ),
        (
            "encoded_word_q.eml",
            include_bytes!("../../tests/fixtures/mime/encoded_word_q.eml"),
        ),
        (
            "folded_ct.eml",
            include_bytes!("../../tests/fixtures/mime/folded_ct.eml"),
        ),
        (
            "folded_ct_2231.eml",
            include_bytes!("../../tests/fixtures/mime/folded_ct_2231.eml"),
        ),
        (
            "binary_cte.eml",
            include_bytes!("../../tests/fixtures/mime/binary_cte.eml"),
        ),
        (
            "long_header.eml",
            include_bytes!("../../tests/fixtures/mime/long_header.eml"),
        ),
        (
            "denied_header.eml",
            include_bytes!("../../tests/fixtures/mime/denied_header.eml"),
        ),
        (
            "forwarded.eml",
            include_bytes!("../../tests/fixtures/mime/forwarded.eml"),
        ),
    ];

    /// What Python's `email` reads as each part's file name (written by gen.py).
    const PYTHON_NAMES: &str = include_str!("../../tests/fixtures/mime/expected.txt");

    fn fixture(name: &str) -> &'static [u8] {
        FIXTURES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, bytes)| *bytes)
            .expect("fixture listed")
    }

    #[test]
    fn fixtures_walk_the_mime_tree_as_python_does() {
        let rules = compiled(asa());
        let mut seen = 0;
        for line in PYTHON_NAMES.lines() {
            let mut fields = line.split('\t');
            let file = fields.next().expect("file name");
            let expected: Vec<Vec<u8>> = fields.map(|n| n.as_bytes().to_vec()).collect();
            let run = scan_all(&rules, fixture(file));
            assert_eq!(run.names, expected, "{file}");
            seen += 1;
        }
        assert_eq!(seen, FIXTURES.len());
    }

    #[test]
    fn fixtures_break_the_rules_they_were_written_for() {
        let rules = compiled(asa());
        let cases: [(&str, &[(Rule, &str)]); 12] = [
            ("nested.eml", &[]),
            ("nested_exe.eml", &[(Rule::FilenameExtension, "setup.exe")]),
            (
                "rfc2231.eml",
                &[(Rule::FilenameExtension, r"na\xC3\xAFve.exe")],
            ),
            (
                "rfc2231_continued.eml",
                &[(
                    Rule::FilenameExtension,
                    r"tr\xC3\xA8s tr\xC3\xA8s tr\xC3\xA8s long nom...ccents partout.js",
                )],
            ),
            (
                "encoded_word_b.eml",
                &[(Rule::FilenameExtension, r"na\xC3\xAFve.scr")],
            ),
            (
                "encoded_word_q.eml",
                &[(Rule::FilenameExtension, r"r\xC3\xA9sum\xC3\xA9.vbs")],
            ),
            ("folded_ct.eml", &[(Rule::FilenameExtension, "script.js")]),
            (
                "folded_ct_2231.eml",
                &[(Rule::FilenameExtension, "macro.vbs")],
            ),
            ("binary_cte.eml", &[(Rule::Encoding, "binary")]),
            ("long_header.eml", &[(Rule::HeaderLineLength, "X-Long")]),
            ("denied_header.eml", &[(Rule::DenyHeader, "X-Link2State")]),
            ("forwarded.eml", &[(Rule::FilenameExtension, "invoice.vbs")]),
        ];
        for (file, expected) in cases {
            let run = scan_all(&rules, fixture(file));
            assert_eq!(run.pairs(), expected, "{file}");
        }
    }

    #[test]
    fn fixtures_give_the_same_findings_in_any_single_cut() {
        let rules = compiled(small());
        for (file, msg) in FIXTURES {
            for framing in [Framing::Bdat, Framing::Data] {
                let msg = if framing == Framing::Data {
                    stuff(msg)
                } else {
                    msg.to_vec()
                };
                let model = whole(&rules, framing, &msg);
                for cut in 0..=msg.len() {
                    assert_eq!(
                        scan_cuts(&rules, framing, &msg, &[cut]),
                        model,
                        "{file} cut {cut}"
                    );
                }
            }
        }
    }

    #[test]
    fn boundary_split_at_every_pair_of_offsets() {
        let rules = compiled(asa());
        let msg: &[u8] = b"Content-Type: multipart/mixed; boundary=\"simple boundary\"\r\n\r\n\
            preamble\r\n--simple boundary \t\r\n\
            Content-Disposition: attachment; filename=x.exe\r\n\r\nMZ\r\n\
            --simple boundary--\r\nepilogue\r\n";
        let model = whole(&rules, Framing::Bdat, msg);
        assert_eq!(model.pairs(), [(Rule::FilenameExtension, "x.exe")]);
        for a in 0..=msg.len() {
            for b in a..=msg.len() {
                assert_eq!(
                    scan_cuts(&rules, Framing::Bdat, msg, &[a, b]),
                    model,
                    "cuts {a} {b}"
                );
            }
        }
    }

    /// A multipart message around `part` (a part's header block and body, CRLF-terminated).
    fn multipart(part: &str) -> Vec<u8> {
        format!(
            "Subject: t\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n\
             --b\r\n{part}--b--\r\n"
        )
        .into_bytes()
    }

    fn attachment(param: &str) -> Vec<u8> {
        multipart(&format!(
            "Content-Disposition: attachment; {param}\r\n\r\nMZ\r\n"
        ))
    }

    #[test]
    fn header_line_length_at_and_over_the_limit() {
        let rules = compiled(ContentRules {
            max_header_line_length: 998,
            ..ContentRules::default()
        });
        let line = |len: usize| format!("X-Pad: {}\r\n", "a".repeat(len - 7));
        let ok = format!("Subject: t\r\n{}\r\nbody\r\n", line(998));
        assert_eq!(check(&rules, ok.as_bytes()), []);
        let over = format!("Subject: t\r\n{}\r\nbody\r\n", line(999));
        assert_eq!(
            check(&rules, over.as_bytes()),
            [(Rule::HeaderLineLength, "X-Pad".into())]
        );
        // A folded line counts alone, and names its field.
        let folded = format!("X-Pad: a\r\n {}\r\n\r\n", "b".repeat(998));
        assert_eq!(
            check(&rules, folded.as_bytes()),
            [(Rule::HeaderLineLength, "X-Pad".into())]
        );
        // Without an ending at all (the message ends inside the line).
        let open = format!("Subject: t\r\n{}", &line(999)[..999]);
        assert_eq!(
            check(&rules, open.as_bytes()),
            [(Rule::HeaderLineLength, "X-Pad".into())]
        );
        // Body lines are not header lines.
        let body = format!("Subject: t\r\n\r\n{}\r\n", "a".repeat(2000));
        assert_eq!(check(&rules, body.as_bytes()), []);
        // A name longer than the limit is named as far as it went when the line overflowed.
        let rules = compiled(ContentRules {
            max_header_line_length: 4,
            ..ContentRules::default()
        });
        assert_eq!(
            check(&rules, b"Subject-Of-It: x\r\n\r\n"),
            [(Rule::HeaderLineLength, "Subjec".into())]
        );
    }

    #[test]
    fn dot_stuffing_is_not_counted() {
        let rules = compiled(ContentRules {
            max_header_line_length: 10,
            max_body_line_length: 10,
            ..ContentRules::default()
        });
        // `.` + 9 bytes: 10 in the message, 11 on the wire in a DATA body.
        let msg = b".234567890\r\n\r\n.234567890\r\n";
        assert_eq!(check(&rules, msg), []);
        let data = stuff(msg);
        assert_eq!(data.len(), msg.len() + 2);
        assert_eq!(whole(&rules, Framing::Data, &data).findings, []);
        // The same wire bytes in a BDAT body are one byte too long, twice.
        assert_eq!(
            whole(&rules, Framing::Bdat, &data).rules(),
            [Rule::HeaderLineLength, Rule::BodyLineLength]
        );
    }

    #[test]
    fn header_size_at_and_over_the_limit() {
        let block = "From: a@example.org\r\nSubject: t\r\n X\r\n\r\n";
        let msg = format!("{block}body {}\r\n", "b".repeat(100));
        for (max, broken) in [(block.len(), false), (block.len() - 1, true)] {
            let rules = compiled(ContentRules {
                max_header_size: max,
                ..ContentRules::default()
            });
            let expected: &[Rule] = if broken { &[Rule::HeaderSize] } else { &[] };
            assert_eq!(rules_of(&rules, msg.as_bytes()), expected, "max {max}");
        }
        // Certain before the line ends: a huge header line reports at once.
        let rules = compiled(ContentRules {
            max_header_size: 100,
            ..ContentRules::default()
        });
        let mut scanner = ContentScanner::new(rules, Framing::Data);
        let mut findings = Vec::new();
        scanner.feed(format!("X-Big: {}", "a".repeat(200)).as_bytes(), &mut |f| {
            findings.push(f)
        });
        assert_eq!(findings.len(), 1);
        assert!(!scanner.needs_input());
    }

    #[test]
    fn denied_headers_only_at_the_top_and_as_whole_names() {
        let rules = compiled(asa());
        let cases: [(&[u8], bool); 8] = [
            (b"X-Link2State: route\r\n\r\n", true),
            (b"x-link2state:route\r\n\r\n", true),
            (b"X-Link2State : route\r\n\r\n", true),
            (b"X-Link2Stat: route\r\n\r\n", false),
            (b"X-Link2States: route\r\n\r\n", false),
            (b"Subject: x\r\n X-Link2State: folded\r\n\r\n", false),
            (b"Subject: x\r\n\r\nX-Link2State: body\r\n", false),
            (b"Subject: x\r\nX-Link2State", false),
        ];
        for (msg, denied) in cases {
            let expected: &[Rule] = if denied { &[Rule::DenyHeader] } else { &[] };
            assert_eq!(
                rules_of(&rules, msg),
                expected,
                "{}",
                String::from_utf8_lossy(msg)
            );
        }
        let part = multipart("X-Link2State: in a part\r\n\r\nbody\r\n");
        assert_eq!(rules_of(&rules, &part), []);
    }

    #[test]
    fn extensions_match_whole_and_at_the_end() {
        let rules = compiled(ContentRules {
            deny_filename_extensions: vec!["exe".into(), "*.JS".into(), ".tar.gz".into()],
            ..ContentRules::default()
        });
        let cases: [(&str, bool); 21] = [
            ("filename=\"a.exe\"", true),
            ("filename=\"a.EXE\"", true),
            ("filename=a.Exe", true),
            ("filename=\"a.exes\"", false),
            ("filename=\"exe.txt\"", false),
            ("filename=\"exe\"", false),
            ("filename=\"a.exe.\"", true),
            ("filename=\"a.exe  \"", true),
            ("filename=\"a.exe. . \"", true),
            ("filename=\"a.js\"", true),
            ("filename=\"a.json\"", false),
            ("filename=\"backup.TAR.GZ\"", true),
            ("filename=\"backup.gz\"", false),
            ("filename=\"a.txt\" .exe", true),
            ("filename=\"a.\\exe\"", true),
            ("filename*=''a.exe%00.txt", true),
            ("filename*=utf-8''a%2Eexe", true),
            ("filename=\"a.txt\"; filename=\"b.exe\"", true),
            ("filename=\"a.txt\"; filename*=utf-8''b.exe", true),
            ("size=3; filename=a.pdf", false),
            ("name=a.exe", true),
        ];
        for (param, denied) in cases {
            let expected: &[Rule] = if denied {
                &[Rule::FilenameExtension]
            } else {
                &[]
            };
            assert_eq!(rules_of(&rules, &attachment(param)), expected, "{param}");
        }
        // Content-Type `name` counts as much as Content-Disposition `filename`.
        let msg = multipart("Content-Type: application/x; name=\"run.exe\"\r\n\r\nMZ\r\n");
        assert_eq!(rules_of(&rules, &msg), [Rule::FilenameExtension]);
        // A missing `;` does not hide the parameter.
        let msg = multipart("Content-Disposition: attachment filename=\"a.exe\"\r\n\r\nMZ\r\n");
        assert_eq!(rules_of(&rules, &msg), [Rule::FilenameExtension]);
        // So does a single-part message's own header.
        let msg = b"Content-Disposition: attachment; filename=run.exe\r\n\r\nMZ\r\n";
        assert_eq!(rules_of(&rules, msg), [Rule::FilenameExtension]);
    }

    #[test]
    fn filename_length_counts_decoded_characters() {
        let rules = compiled(ContentRules {
            max_filename_length: 255,
            ..ContentRules::default()
        });
        let ascii = |n: usize| format!("filename=\"{}.pdf\"", "a".repeat(n - 4));
        assert_eq!(rules_of(&rules, &attachment(&ascii(255))), []);
        assert_eq!(
            rules_of(&rules, &attachment(&ascii(256))),
            [Rule::FilenameLength]
        );
        // 255 characters of two bytes each, in RFC 2231 continuations.
        let encoded = |n: usize| {
            let chunk = "%C3%A9".repeat((n - 4) / 2);
            let rest = "%C3%A9".repeat(n - 4 - (n - 4) / 2);
            format!("filename*0*=utf-8''{chunk};\r\n filename*1*={rest}.pdf")
        };
        assert_eq!(rules_of(&rules, &attachment(&encoded(255))), []);
        assert_eq!(
            rules_of(&rules, &attachment(&encoded(256))),
            [Rule::FilenameLength]
        );
        // Quotes and spaces around the name are not counted.
        let quoted = format!("filename=\"  \\\"{}\\\"  \"", "a".repeat(255));
        assert_eq!(rules_of(&rules, &attachment(&quoted)), []);
    }

    #[test]
    fn encodings_by_name_and_others() {
        let rules = compiled(ContentRules {
            deny_encodings: vec!["Binary".into()],
            ..ContentRules::default()
        });
        let part = |cte: &str| multipart(&format!("Content-Transfer-Encoding: {cte}\r\n\r\nx\r\n"));
        assert_eq!(
            check(&rules, &part("BINARY")),
            [(Rule::Encoding, "BINARY".into())]
        );
        assert_eq!(
            check(&rules, &part(" binary (raw)")),
            [(Rule::Encoding, "binary".into())]
        );
        assert_eq!(rules_of(&rules, &part("8bit")), []);
        assert_eq!(rules_of(&rules, &part("binaryx")), []);
        let rules = compiled(ContentRules {
            deny_encodings: vec!["others".into()],
            ..ContentRules::default()
        });
        assert_eq!(rules_of(&rules, &part("x-uuencode")), [Rule::Encoding]);
        for known in ["7bit", "8bit", "binary", "base64", "Quoted-Printable"] {
            assert_eq!(rules_of(&rules, &part(known)), [], "{known}");
        }
        // At the top level too.
        let msg = b"Content-Transfer-Encoding: x-uue\r\n\r\nbegin 644 a.exe\r\n";
        assert_eq!(rules_of(&rules, msg), [Rule::Encoding]);
    }

    #[test]
    fn body_line_length_at_and_over_the_limit() {
        let rules = compiled(ContentRules {
            max_body_line_length: 998,
            ..ContentRules::default()
        });
        let body = |len: usize, ending: &str| {
            format!(
                "Subject: t\r\n\r\nshort\r\n{}{ending}short\r\n",
                "a".repeat(len)
            )
        };
        assert_eq!(rules_of(&rules, body(998, "\r\n").as_bytes()), []);
        assert_eq!(
            rules_of(&rules, body(999, "\r\n").as_bytes()),
            [Rule::BodyLineLength]
        );
        assert_eq!(rules_of(&rules, body(998, "\n").as_bytes()), []);
        assert_eq!(
            rules_of(&rules, body(999, "\n").as_bytes()),
            [Rule::BodyLineLength]
        );
        // A CR that no LF follows is content.
        assert_eq!(
            rules_of(&rules, body(998, "\rx\r\n").as_bytes()),
            [Rule::BodyLineLength]
        );
        // The last line, without an ending.
        let open = format!("Subject: t\r\n\r\n{}", "a".repeat(999));
        assert_eq!(rules_of(&rules, open.as_bytes()), [Rule::BodyLineLength]);
        // Part headers and boundary lines are body lines.
        let part = multipart(&format!("X-Pad: {}\r\n\r\nx\r\n", "a".repeat(992)));
        assert_eq!(rules_of(&rules, &part), [Rule::BodyLineLength]);
        let part = multipart(&format!("X-Pad: {}\r\n\r\nx\r\n", "a".repeat(991)));
        assert_eq!(rules_of(&rules, &part), []);
    }

    #[test]
    fn long_lines_split_anywhere() {
        let rules = compiled(ContentRules {
            max_body_line_length: 20,
            ..ContentRules::default()
        });
        for len in 15..25 {
            for dotted in [false, true] {
                let line = if dotted {
                    format!(".{}", "a".repeat(len - 1))
                } else {
                    "a".repeat(len)
                };
                let msg = format!(
                    "S: t\r\n\r\n{}\r\nxx\r\n{line}\r\n{line}\r\n",
                    "b".repeat(9)
                );
                let expected: &[Rule] = if len > 20 {
                    &[Rule::BodyLineLength]
                } else {
                    &[]
                };
                let msg = msg.as_bytes();
                assert_eq!(rules_of(&rules, msg), expected, "{len}");
                for (framing, msg) in [(Framing::Bdat, msg.to_vec()), (Framing::Data, stuff(msg))] {
                    for cut in 0..=msg.len() {
                        let run = scan_cuts(&rules, framing, &msg, &[cut]);
                        assert_eq!(run.rules(), expected, "{len} {framing:?} cut {cut}");
                    }
                }
            }
        }
    }

    /// `depth` multiparts, one inside the other, and an attachment in the innermost.
    fn nested(depth: usize, name: &str) -> Vec<u8> {
        let mut msg = String::from("Subject: deep\r\n");
        for level in 0..depth {
            msg.push_str(&format!(
                "Content-Type: multipart/mixed; boundary=\"l{level}\"\r\n\r\n--l{level}\r\n"
            ));
        }
        msg.push_str(&format!(
            "Content-Disposition: attachment; filename=\"{name}\"\r\n\r\nMZ\r\n"
        ));
        for level in (0..depth).rev() {
            msg.push_str(&format!("--l{level}--\r\n"));
        }
        msg.into_bytes()
    }

    #[test]
    fn nesting_depth_at_and_over_the_limit() {
        let rules = compiled(asa());
        assert_eq!(rules_of(&rules, &nested(16, "a.txt")), []);
        assert_eq!(
            rules_of(&rules, &nested(16, "a.exe")),
            [Rule::FilenameExtension]
        );
        assert_eq!(
            check(&rules, &nested(17, "a.exe")),
            [(
                Rule::MimeStructure,
                "multipart nested deeper than 16".into()
            )]
        );
        // With the rule off, deeper parts are opaque: their names go unchecked.
        let off = compiled(ContentRules {
            max_mime_depth: 0,
            ..asa()
        });
        assert_eq!(rules_of(&off, &nested(17, "a.exe")), []);
        let three = compiled(ContentRules {
            max_mime_depth: 3,
            ..asa()
        });
        assert_eq!(
            rules_of(&three, &nested(3, "a.exe")),
            [Rule::FilenameExtension]
        );
        assert_eq!(rules_of(&three, &nested(4, "a.exe")), [Rule::MimeStructure]);
        assert_eq!(
            rules_of(&three, fixture("nested_exe.eml")),
            [Rule::FilenameExtension]
        );
        let two = compiled(ContentRules {
            max_mime_depth: 2,
            ..asa()
        });
        assert_eq!(
            rules_of(&two, fixture("nested_exe.eml")),
            [Rule::MimeStructure]
        );
    }

    #[test]
    fn oversized_structure_is_reported() {
        let rules = compiled(asa());
        let boundary = "b".repeat(BOUNDARY_CAP);
        let ok = format!(
            "Content-Type: multipart/mixed; boundary={boundary}\r\n\r\n--{boundary}\r\n\
             Content-Type: text/plain; name=a.exe\r\n\r\nx\r\n--{boundary}--\r\n"
        );
        assert_eq!(rules_of(&rules, ok.as_bytes()), [Rule::FilenameExtension]);
        let long = ok.replace(&boundary, &format!("{boundary}b"));
        assert_eq!(
            check(&rules, long.as_bytes()),
            [(Rule::MimeStructure, "boundary over 200 bytes".into())]
        );
        // A Content-Disposition past the cap (folded, so that no line is too long): the name
        // beyond the cap is not read.
        let folded = |len: usize| vec!["x".repeat(99); len / 100].join("\r\n ");
        let pad = folded(FIELD_CAP + 200);
        let msg = attachment(&format!("pad=\"{pad}\";\r\n filename=a.exe"));
        assert_eq!(
            check(&rules, &msg),
            [(
                Rule::MimeStructure,
                "Content-Disposition over 8192 bytes".into()
            )]
        );
        // Within the cap, it is.
        let pad = folded(FIELD_CAP - 300);
        let msg = attachment(&format!("pad=\"{pad}\";\r\n filename=a.exe"));
        assert_eq!(rules_of(&rules, &msg), [Rule::FilenameExtension]);
    }

    #[test]
    fn boundary_lines() {
        let rules = compiled(asa());
        let msg = |lines: &str| {
            format!(
                "Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n{lines}\
                 Content-Type: text/plain; name=x.exe\r\n\r\nx\r\n"
            )
            .into_bytes()
        };
        // Lines that open a part (so that the name is read) and lines that do not.
        for (lines, part) in [
            ("--b\r\n", true),
            ("--b \t \r\n", true),
            ("--b\n", true),
            ("x\r\n--b\r\n", true),
            ("--b--\r\n", false),
            ("--bb\r\n", false),
            ("--B\r\n", false),
            ("--b x\r\n", false),
            (" --b\r\n", false),
            ("-b\r\n", false),
            ("x--b\r\n", false),
            ("..--b\r\n", false),
        ] {
            let expected: &[Rule] = if part {
                &[Rule::FilenameExtension]
            } else {
                &[]
            };
            assert_eq!(rules_of(&rules, &msg(lines)), expected, "{lines:?}");
        }
        // Padding past the line buffer still counts as padding.
        let padded = format!("--b{}\r\n", " ".repeat(3 * HEAD_CAP));
        assert_eq!(rules_of(&rules, &msg(&padded)), [Rule::FilenameExtension]);
        let junk = format!("--b{}x\r\n", " ".repeat(3 * HEAD_CAP));
        assert_eq!(rules_of(&rules, &msg(&junk)), []);
    }

    #[test]
    fn outer_boundary_closes_inner_parts() {
        let rules = compiled(asa());
        // The inner multipart is never closed; the outer boundary ends it, and the next
        // part's headers are read again.
        let msg = b"Content-Type: multipart/mixed; boundary=outer\r\n\r\n--outer\r\n\
            Content-Type: multipart/alternative; boundary=inner\r\n\r\n--inner\r\n\
            Content-Type: text/plain\r\n\r\ntext\r\n--outer\r\n\
            Content-Type: application/x; name=\"a.exe\"\r\n\r\nMZ\r\n--outer--\r\n\
            --inner\r\nContent-Type: text/plain; name=b.js\r\n\r\n";
        let run = scan_all(&rules, msg);
        assert_eq!(run.pairs(), [(Rule::FilenameExtension, "a.exe")]);
        // After the outer close, `--inner` is epilogue: b.js is not a part.
        assert_eq!(run.names, [b"a.exe".to_vec()]);
    }

    #[test]
    fn a_boundary_ends_a_part_without_a_body() {
        let rules = compiled(asa());
        let msg = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\
            Content-Type: text/plain\r\n--b\r\nContent-Type: text/plain; name=a.exe\r\n\r\n--b--\r\n";
        assert_eq!(scan_all(&rules, msg).names, [b"a.exe".to_vec()]);
    }

    #[test]
    fn first_content_type_decides_the_structure() {
        let rules = compiled(asa());
        let msg = b"Content-Type: text/plain; name=a.txt\r\n\
            Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\
            Content-Type: text/plain; name=x.exe\r\n\r\n--b--\r\n";
        let run = scan_all(&rules, msg);
        assert_eq!(run.rules(), []);
        assert_eq!(run.names, [b"a.txt".to_vec()]);
    }

    #[test]
    fn encoded_embedded_messages_are_opaque() {
        let rules = compiled(asa());
        let part = |cte: &str| {
            multipart(&format!(
                "Content-Type: message/rfc822\r\nContent-Transfer-Encoding: {cte}\r\n\r\n\
                 Subject: inner\r\nContent-Disposition: attachment; filename=i.exe\r\n\r\nMZ\r\n"
            ))
        };
        assert_eq!(rules_of(&rules, &part("7bit")), [Rule::FilenameExtension]);
        assert_eq!(rules_of(&rules, &part("base64")), []);
    }

    #[test]
    fn each_rule_fires_once_and_scanning_stops_when_all_have() {
        let rules = compiled(ContentRules {
            deny_filename_extensions: vec!["exe".into()],
            ..ContentRules::default()
        });
        let msg = multipart(
            "Content-Type: a/b; name=a.exe\r\n\r\n--b\r\nContent-Type: a/b; name=b.exe\r\n\r\n",
        );
        let mut scanner = ContentScanner::new(rules, Framing::Bdat);
        let mut findings = Vec::new();
        scanner.feed(&msg, &mut |f| findings.push(f));
        assert_eq!(findings.len(), 1);
        assert_eq!(findings[0].detail, "a.exe");
        assert!(!scanner.needs_input());
        assert_eq!(scanner.names.len(), 1, "stopped after the first finding");
        scanner.finish(&mut |f| findings.push(f));
        assert_eq!(findings.len(), 1);
    }

    #[test]
    fn no_rules_no_work() {
        let rules = compiled(ContentRules::default());
        assert!(!rules.any());
        let scanner = ContentScanner::new(rules, Framing::Data);
        assert!(!scanner.needs_input());
    }

    #[test]
    fn encoded_words_decode() {
        let cases: [(&[u8], &[u8]); 9] = [
            (b"=?UTF-8?B?bmHDr3ZlLmV4ZQ==?=", "naïve.exe".as_bytes()),
            (b"=?utf-8?b?bmHDr3ZlLmV4ZQ?=", "naïve.exe".as_bytes()),
            (
                b"=?iso-8859-1?Q?r=E9sum=E9_final.vbs?=",
                "résumé final.vbs".as_bytes(),
            ),
            (b"=?utf-8?q?a?= \t =?utf-8?q?b.exe?=", b"ab.exe"),
            (b"=?utf-8?q?a?= x =?utf-8?q?.exe?=", b"a x .exe"),
            (b"pre =?utf-8*en?q?a.exe?=", b"pre a.exe"),
            (b"=?utf-8?x?a?=", b"=?utf-8?x?a?="),
            (b"=?utf-8?q?unterminated", b"=?utf-8?q?unterminated"),
            (b"=?koi8-r?Q?=E1.exe?=", b"\xE1.exe"),
        ];
        for (input, expected) in cases {
            let mut out = Vec::new();
            decode_words(input, &mut out);
            assert_eq!(out, expected, "{}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn rfc2231_sections_in_any_order() {
        let value = b"attachment; filename*2=\"c.exe\"; filename*0*=iso-8859-1'fr'%E9; \
            filename*1*=%20b; filename*1=ignored; x=y";
        let mut out = Vec::new();
        let charset = rfc2231(value, b"filename", &mut out);
        assert_eq!(charset, Some(Charset::Latin1));
        assert_eq!(out, b"\xE9 bc.exe");
        let mut out = Vec::new();
        assert_eq!(rfc2231(b"inline; name*=x", b"filename", &mut out), None);
        // Without the two quotes, the text has no charset.
        let mut out = Vec::new();
        assert_eq!(
            rfc2231(b"a; filename*=a%2Eexe", b"filename", &mut out),
            Some(Charset::Bytes)
        );
        assert_eq!(out, b"a.exe");
    }

    #[test]
    fn params_split_outside_quotes_only() {
        let value = b"attachment; filename=\"a;b\\\".exe\"; size = 3 ;flag; x=\"open";
        let got: Vec<(Vec<u8>, Vec<u8>)> = params(value)
            .map(|p| {
                let mut v = Vec::new();
                unquote(&p, &mut v);
                (p.name.to_vec(), v)
            })
            .collect();
        let expected: Vec<(Vec<u8>, Vec<u8>)> = [
            (&b"filename"[..], &b"a;b\".exe"[..]),
            (b"size", b"3"),
            (b"x", b"open"),
        ]
        .iter()
        .map(|(n, v)| (n.to_vec(), v.to_vec()))
        .collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn details_are_escaped_and_short() {
        assert_eq!(escape(b"a\\b\r\n\xC3\xA9"), r"a\\b\x0D\x0A\xC3\xA9");
        let long = format!("{}.exe", "a".repeat(100));
        let detail = escape(long.as_bytes());
        assert_eq!(
            detail,
            format!("{}...{}.exe", "a".repeat(44), "a".repeat(13))
        );
        assert_eq!(detail.len(), DETAIL_CAP);
        let binary: Vec<u8> = (0..=255u8).collect();
        let detail = escape(&binary);
        assert!(detail.len() <= DETAIL_CAP);
        assert!(detail.ends_with(r"\xFF"));
    }

    #[test]
    fn terminator_line_is_harmless() {
        let rules = compiled(asa());
        for msg in [
            &b"Subject: t\r\n.\r\n"[..],
            b"Subject: t\r\n\r\nbody\r\n.\r\n",
        ] {
            assert_eq!(whole(&rules, Framing::Data, msg).findings, []);
        }
    }

    // The line rules, read the slow and obvious way: whole lines, no state carried.
    fn line_oracle(msg: &[u8], rules: &ContentRules, framing: Framing) -> BTreeSet<Rule> {
        let mut found = BTreeSet::new();
        let mut in_headers = true;
        let mut size = 0;
        let mut lines: Vec<&[u8]> = msg.split(|&b| b == b'\n').collect();
        if lines.last().is_some_and(|l| l.is_empty()) {
            lines.pop();
        }
        for line in lines {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let line = match framing {
                Framing::Data => line.strip_prefix(b".").unwrap_or(line),
                Framing::Bdat => line,
            };
            if !in_headers {
                if line.len() > rules.max_body_line_length {
                    found.insert(Rule::BodyLineLength);
                }
                continue;
            }
            if line.len() > rules.max_header_line_length {
                found.insert(Rule::HeaderLineLength);
            }
            size += line.len() + 2;
            if size > rules.max_header_size {
                found.insert(Rule::HeaderSize);
            }
            if line.is_empty() {
                in_headers = false;
            } else if !matches!(line[0], b' ' | b'\t') {
                if let Some(colon) = line.iter().position(|&b| b == b':') {
                    let name = trim_end(&line[..colon]);
                    if rules
                        .deny_headers
                        .iter()
                        .any(|d| d.as_bytes().eq_ignore_ascii_case(name))
                    {
                        found.insert(Rule::DenyHeader);
                    }
                }
            }
        }
        found
    }

    fn fragments() -> impl Strategy<Value = Vec<u8>> {
        let fragment = prop::sample::select(vec![
            &b"\r\n"[..],
            b"\n",
            b"\r",
            b".",
            b"..",
            b"-",
            b"--",
            b"--b",
            b"--b--",
            b"--c",
            b" ",
            b"\t",
            b":",
            b"x",
            b"xxxxxxxxxx",
            b"xxxxxxxxxxxxxxxxxxxxxxx",
            b"xxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
            b"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
            b"X-Bad: 1\r\n",
            b"x-bad:",
            b"Subject: hello\r\n",
            b" folded\r\n",
            b"Content-Type: multipart/mixed; boundary=b\r\n",
            b"Content-Type: multipart/mixed;\r\n boundary=\"c\"\r\n",
            b"Content-Type: message/rfc822\r\n",
            b"Content-Disposition: attachment; filename=\"a.exe\"\r\n",
            b"Content-Disposition: attachment; filename*=utf-8''b%2Eexe\r\n",
            b"Content-Type: text/plain; name==?utf-8?Q?c=2Etar.gz?=\r\n",
            b"Content-Type: text/plain; name=\"long-name-over-12.txt\"\r\n",
            b"Content-Transfer-Encoding: binary\r\n",
            b"\r\n--b\r\n",
            b"\r\n--c--\r\n",
            b"\r\n\r\n",
        ]);
        prop::collection::vec(fragment, 0..60).prop_map(|parts| parts.concat())
    }

    fn cuts(max: usize) -> impl Strategy<Value = Vec<usize>> {
        prop::collection::vec(0..=max, 0..10).prop_map(|mut cuts| {
            cuts.sort_unstable();
            cuts
        })
    }

    /// A MIME tree for the structure oracle.
    #[derive(Clone, Debug)]
    enum Node {
        Leaf {
            name: Option<(&'static str, u8)>,
            lines: Vec<u8>,
        },
        Multi {
            parts: Vec<Node>,
            noise: Vec<u8>,
        },
    }

    const NAMES: [&str; 9] = [
        "a.txt",
        "b.exe",
        "C.EXE",
        "d.exes",
        "e.exe.",
        "f h.exe",
        "naïve.exe",
        "exe.pdf",
        "g.pdf",
    ];

    fn denied(name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        let name = name.trim_end_matches(['.', ' ']);
        name.rsplit_once('.').is_some_and(|(_, ext)| ext == "exe")
    }

    fn tree() -> impl Strategy<Value = Node> {
        let name = prop::option::of((prop::sample::select(NAMES.to_vec()), 0u8..4));
        let lines = prop::collection::vec(0u8..12, 0..4);
        let leaf = (name, lines).prop_map(|(name, lines)| Node::Leaf { name, lines });
        leaf.prop_recursive(4, 24, 4, |inner| {
            (
                prop::collection::vec(inner, 1..4),
                prop::collection::vec(0u8..12, 0..3),
            )
                .prop_map(|(parts, noise)| Node::Multi { parts, noise })
        })
    }

    fn base64(bytes: &[u8]) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n =
                chunk.iter().fold(0u32, |n, &b| n << 8 | u32::from(b)) << (8 * (3 - chunk.len()));
            for i in 0..=chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            }
            out.push_str(&"=".repeat(3 - chunk.len()));
        }
        out
    }

    /// Body lines that look like boundary lines of `boundary` but are not, and others.
    fn noise_line(kind: u8, boundary: &str) -> String {
        match kind {
            0 => format!("--{boundary}x"),
            1 => format!("--{boundary}--x"),
            2 => format!("--{boundary} x"),
            3 => format!("-{boundary}"),
            4 => format!("--{}", boundary.to_ascii_uppercase()),
            5 => format!(" --{boundary}"),
            6 => ".".into(),
            7 => format!("..--{boundary}"),
            8 => "-- ".into(),
            9 => String::new(),
            10 => "Content-Disposition: attachment; filename=noise.exe".into(),
            _ => "x".repeat(40),
        }
    }

    fn render(
        node: &Node,
        next: &mut usize,
        enclosing: &str,
        out: &mut String,
        names: &mut Vec<String>,
    ) {
        match node {
            Node::Leaf { name, lines } => {
                out.push_str("Content-Type: text/plain\r\n");
                if let Some((name, form)) = name {
                    let param = match form {
                        0 => format!("filename=\"{name}\""),
                        1 => format!(
                            "filename*=utf-8''{}",
                            name.bytes()
                                .map(|b| format!("%{b:02X}"))
                                .collect::<String>()
                        ),
                        2 => format!("filename=\"=?utf-8?B?{}?=\"", base64(name.as_bytes())),
                        _ => format!("\r\n\tfilename=\"{name}\"; size=1"),
                    };
                    out.push_str(&format!("Content-Disposition: attachment; {param}\r\n"));
                    names.push(name.to_string());
                }
                out.push_str("\r\n");
                for &kind in lines {
                    out.push_str(&noise_line(kind, enclosing));
                    out.push_str("\r\n");
                }
            }
            Node::Multi { parts, noise } => {
                let boundary = format!("b{next}");
                *next += 1;
                out.push_str(&format!(
                    "Content-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\r\n"
                ));
                for &kind in noise {
                    out.push_str(&noise_line(kind, &boundary));
                    out.push_str("\r\n");
                }
                for part in parts {
                    out.push_str(&format!("--{boundary}\r\n"));
                    render(part, next, &boundary, out, names);
                }
                out.push_str(&format!("--{boundary}--\r\n"));
                for &kind in noise {
                    out.push_str(&noise_line(kind, &boundary));
                    out.push_str("\r\n");
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_split_gives_the_same_findings(msg in fragments(), cuts in cuts(400)) {
            let rules = compiled(small());
            for framing in [Framing::Bdat, Framing::Data] {
                let model = whole(&rules, framing, &msg);
                prop_assert_eq!(&scan_cuts(&rules, framing, &msg, &cuts), &model);
                prop_assert_eq!(&bytewise(&rules, framing, &msg), &model);
            }
        }

        #[test]
        fn line_rules_match_the_oracle(msg in fragments(), cuts in cuts(400)) {
            let plain = small();
            let rules = compiled(plain.clone());
            let line_rules = [Rule::HeaderSize, Rule::HeaderLineLength, Rule::DenyHeader, Rule::BodyLineLength];
            for framing in [Framing::Bdat, Framing::Data] {
                let run = scan_cuts(&rules, framing, &msg, &cuts);
                let got: BTreeSet<Rule> = run.rules().into_iter().filter(|r| line_rules.contains(r)).collect();
                prop_assert_eq!(got, line_oracle(&msg, &plain, framing));
            }
        }

        #[test]
        fn mime_trees_match_the_oracle(root in tree(), cuts in cuts(3000)) {
            let mut text = String::from("Subject: tree\r\n");
            let mut names = Vec::new();
            render(&root, &mut 0, "none", &mut text, &mut names);
            // The body line rule never fires here: it keeps the scan going past the first
            // denied name, so that every name is seen.
            let rules = compiled(ContentRules {
                deny_filename_extensions: vec!["exe".into()],
                max_mime_depth: 16,
                max_body_line_length: 1000,
                ..ContentRules::default()
            });
            let expected: Vec<Vec<u8>> = names.iter().map(|n| n.trim_end().as_bytes().to_vec()).collect();
            let any_denied = names.iter().any(|n| denied(n));
            for framing in [Framing::Bdat, Framing::Data] {
                let msg = if framing == Framing::Data { stuff(text.as_bytes()) } else { text.clone().into_bytes() };
                let run = scan_cuts(&rules, framing, &msg, &cuts);
                let denied_rule: &[Rule] = if any_denied { &[Rule::FilenameExtension] } else { &[] };
                prop_assert_eq!(run.rules(), denied_rule);
                prop_assert_eq!(&run.names, &expected);
            }
        }
    }
}
