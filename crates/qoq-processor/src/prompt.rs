//! The prompt (spec §3.1, §3.2): the QoQ format prompt, the user message built from it
//! (`RLHFDataset._build_messages`) and the chat template with the time-series branch
//! (`TimeSeriesQwen2_5_VLProcessor.chat_template`), rendered with `minijinja`.
//!
//! * The format prompt is rendered as Jinja2's defaults do (`Template(src.strip())`, no block
//!   trimming, no autoescape).
//! * The chat template is rendered as `apply_chat_template` does (`trim_blocks`,
//!   `lstrip_blocks`).
//!
//! Both default templates are embedded files (`templates/`); users can pass their own.

use crate::error::{Error, Result};
use minijinja::Environment;
use serde::Serialize;

/// `examples/format_prompt/medical_format.jinja` of the reference, byte for byte (507 bytes,
/// typo "list od" included).
pub const DEFAULT_FORMAT_PROMPT: &str = include_str!("../templates/medical_format.jinja");
/// The Qwen2.5-VL chat template with QoQ's `time-series` branch.
pub const DEFAULT_CHAT_TEMPLATE: &str = include_str!("../templates/chat_template.jinja");

/// The `<image>` placeholder of the question text.
pub const IMAGE_PLACEHOLDER: &str = "<image>";

/// One item of a message's content list.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ContentItem {
    /// Text.
    Text {
        /// The text.
        text: String,
    },
    /// An image (rendered `<|vision_start|><|image_pad|><|vision_end|>`).
    Image,
    /// A video (rendered `<|vision_start|><|video_pad|><|vision_end|>`).
    Video,
    /// The ECG (rendered `<|time_series_pad|>`).
    TimeSeries,
}

/// A message's content: a plain string or a list of items.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Content {
    /// A string.
    Text(String),
    /// A list of items.
    Items(Vec<ContentItem>),
}

/// A chat message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The content.
    pub content: Content,
}

/// The user content the reference builds from the rendered question: split on `<image>`; the
/// first chunk is text when non-empty; every later chunk is preceded by an image item; the ECG
/// item, when `with_time_series`, goes last.
pub fn user_content(prompt: &str, with_time_series: bool) -> Vec<ContentItem> {
    let mut items = Vec::new();
    for (i, chunk) in prompt.split(IMAGE_PLACEHOLDER).enumerate() {
        if i != 0 {
            items.push(ContentItem::Image);
        }
        if !chunk.is_empty() {
            items.push(ContentItem::Text {
                text: chunk.to_string(),
            });
        }
    }
    if with_time_series {
        items.push(ContentItem::TimeSeries);
    }
    items
}

/// Renders the format prompt and the chat template.
#[derive(Debug)]
pub struct PromptBuilder {
    format_env: Option<Environment<'static>>,
    chat_env: Environment<'static>,
}

const FORMAT: &str = "format_prompt";
const CHAT: &str = "chat_template";

impl PromptBuilder {
    /// Compile the templates: `format_prompt` is the source of a format prompt (`None`: the
    /// question is used as is), `chat_template` the chat template's source.
    pub fn new(format_prompt: Option<&str>, chat_template: &str) -> Result<Self> {
        let format_env = match format_prompt {
            Some(src) => {
                let mut env = Environment::new();
                env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
                env.add_template_owned(FORMAT, src.trim().to_string())
                    .map_err(|e| template_err(FORMAT, e))?;
                Some(env)
            }
            None => None,
        };
        let mut chat_env = Environment::new();
        chat_env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        chat_env.set_trim_blocks(true);
        chat_env.set_lstrip_blocks(true);
        chat_env
            .add_template_owned(CHAT, chat_template.to_string())
            .map_err(|e| template_err(CHAT, e))?;
        Ok(Self {
            format_env,
            chat_env,
        })
    }

    /// The defaults: the QoQ format prompt (or none) and the QoQ chat template.
    pub fn with_defaults(use_format_prompt: bool) -> Result<Self> {
        Self::new(
            use_format_prompt.then_some(DEFAULT_FORMAT_PROMPT),
            DEFAULT_CHAT_TEMPLATE,
        )
    }

    /// The question after the format prompt (unchanged without one).
    pub fn format(&self, question: &str) -> Result<String> {
        match &self.format_env {
            None => Ok(question.to_string()),
            Some(env) => env
                .get_template(FORMAT)
                .and_then(|t| t.render(minijinja::context! { content => question }))
                .map_err(|e| template_err(FORMAT, e)),
        }
    }

    /// The chat template applied to `messages`.
    pub fn chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.chat_env
            .get_template(CHAT)
            .and_then(|t| {
                t.render(minijinja::context! {
                    messages => messages,
                    add_generation_prompt => add_generation_prompt,
                })
            })
            .map_err(|e| template_err(CHAT, e))
    }

    /// The full prompt of a question: format prompt, user content (with the ECG item when
    /// `with_time_series`), chat template with the generation prompt.
    pub fn prompt(&self, question: &str, with_time_series: bool) -> Result<String> {
        self.prompt_with_system(question, with_time_series, None)
    }

    /// As [`PromptBuilder::prompt`], with a system message first when `system` is given (the
    /// chat template then leaves out its default one).
    pub fn prompt_with_system(
        &self,
        question: &str,
        with_time_series: bool,
        system: Option<&str>,
    ) -> Result<String> {
        self.prompt_with_turns(question, with_time_series, system, &[])
    }

    /// As [`PromptBuilder::prompt_with_system`], with earlier turns of the conversation
    /// (`user` / `assistant` messages, rendered as they are) between the system message and the
    /// question; the format prompt and the ECG item belong to the question, the last user turn.
    pub fn prompt_with_turns(
        &self,
        question: &str,
        with_time_series: bool,
        system: Option<&str>,
        history: &[Message],
    ) -> Result<String> {
        let text = self.format(question)?;
        let mut msgs = Vec::with_capacity(2 + history.len());
        if let Some(sys) = system {
            msgs.push(Message {
                role: "system".into(),
                content: Content::Text(sys.to_string()),
            });
        }
        msgs.extend_from_slice(history);
        msgs.push(Message {
            role: "user".into(),
            content: Content::Items(user_content(&text, with_time_series)),
        });
        self.chat(&msgs, true)
    }
}

fn template_err(name: &str, e: minijinja::Error) -> Error {
    let mut message = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        message.push_str(&format!(": {s}"));
        src = s.source();
    }
    Error::Template {
        name: name.into(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_format_prompt_is_the_reference_file() {
        assert_eq!(DEFAULT_FORMAT_PROMPT.len(), 507);
        assert_eq!(DEFAULT_FORMAT_PROMPT.matches('\n').count(), 1);
        assert!(DEFAULT_FORMAT_PROMPT.contains("with list od bounding box"));
        assert!(DEFAULT_FORMAT_PROMPT.ends_with("MUST BE put in \\boxed{}."));
    }

    #[test]
    fn format_prompt_trims_the_question() {
        let p = PromptBuilder::with_defaults(true).unwrap();
        let out = p.format("  <image>\nWhat is it?\n ").unwrap();
        assert!(
            out.starts_with("<image>\nWhat is it? You FIRST think"),
            "{out}"
        );
        assert!(out.ends_with("\\boxed{}."));
        // No HTML escaping of quotes or brackets.
        assert!(out.contains("\"bbox_2d\""));
        let plain = PromptBuilder::with_defaults(false).unwrap();
        assert_eq!(plain.format(" a ").unwrap(), " a ");
    }

    #[test]
    fn user_content_follows_the_reference_split() {
        let items = user_content("<image> <image>\nAbove", true);
        assert_eq!(
            items,
            vec![
                ContentItem::Image,
                ContentItem::Text { text: " ".into() },
                ContentItem::Image,
                ContentItem::Text {
                    text: "\nAbove".into()
                },
                ContentItem::TimeSeries,
            ]
        );
        assert_eq!(
            user_content("a<image>", false),
            vec![ContentItem::Text { text: "a".into() }, ContentItem::Image]
        );
    }

    #[test]
    fn chat_template_gives_the_spec_prompt() {
        let p = PromptBuilder::with_defaults(false).unwrap();
        let out = p.prompt("<image>\nAbove is a chest X-ray.", true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n\
             <|vision_start|><|image_pad|><|vision_end|>\nAbove is a chest X-ray.\
             <|time_series_pad|><|im_end|>\n<|im_start|>assistant\n"
        );
        let stock = p.prompt("<image>Q", false).unwrap();
        assert!(!stock.contains("time_series"));
        // A system message suppresses the default one; string content is rendered verbatim.
        let msgs = [
            Message {
                role: "system".into(),
                content: Content::Text("S".into()),
            },
            Message {
                role: "user".into(),
                content: Content::Text("U".into()),
            },
        ];
        assert_eq!(
            p.chat(&msgs, false).unwrap(),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
        );
    }

    #[test]
    fn a_system_text_replaces_the_default_system_message() {
        let p = PromptBuilder::with_defaults(false).unwrap();
        let out = p
            .prompt_with_system("<image>Q", true, Some("You are a cardiologist."))
            .unwrap();
        assert!(
            out.starts_with(
                "<|im_start|>system\nYou are a cardiologist.<|im_end|>\n<|im_start|>user\n"
            ),
            "{out}"
        );
        assert!(!out.contains("helpful assistant"));
        assert_eq!(
            p.prompt_with_system("<image>Q", true, None).unwrap(),
            p.prompt("<image>Q", true).unwrap()
        );
    }

    #[test]
    fn bad_template_names_itself() {
        let err = PromptBuilder::new(Some("{{ content "), DEFAULT_CHAT_TEMPLATE).unwrap_err();
        assert!(err.to_string().contains("format_prompt"), "{err}");
    }

    #[test]
    fn earlier_turns_come_between_the_system_message_and_the_question() {
        let p = PromptBuilder::with_defaults(false).unwrap();
        let turn = |role: &str, t: &str| Message {
            role: role.into(),
            content: Content::Text(t.into()),
        };
        let out = p
            .prompt_with_turns(
                "Q2",
                false,
                Some("S"),
                &[turn("user", "Q1"), turn("assistant", "A1")],
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n\
             <|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        // Without a system message the template's default comes first.
        let out = p
            .prompt_with_turns("Q2", false, None, &[turn("user", "Q1")])
            .unwrap();
        assert!(out.starts_with("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nQ1<|im_end|>"), "{out}");
    }
}
