"""How a bare question becomes the model's prompt: one function for evaluation and editing.

With a chat template (``chat_template=auto`` and the tokenizer has one, or ``true``) the question
is the user turn and the prompt ends with the assistant header; the gold answer follows directly.
Without one the prompt is ``Question: <q>\\nAnswer:`` and the answer follows after a space.
"""

from __future__ import annotations

from dataclasses import dataclass

from e2u_tasks.errors import E2UError

CHAT_TEMPLATE_CHOICES = ("auto", "true", "false")


def parse_chat_template(value) -> str:
    text = "auto" if value is None else str(value).strip().lower()
    if text not in CHAT_TEMPLATE_CHOICES:
        raise E2UError(f"chat_template={value!r} is not accepted; use auto, true or false")
    return text


@dataclass(frozen=True)
class PromptFormat:
    use_chat_template: bool
    system_prompt: str | None = None

    @classmethod
    def for_tokenizer(cls, tokenizer, chat_template="auto", system_prompt=None) -> PromptFormat:
        choice = parse_chat_template(chat_template)
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if choice == "true" and not has_template:
            raise E2UError("chat_template=true but the tokenizer has no chat template; use "
                           "chat_template=auto or false")
        use = has_template if choice == "auto" else choice == "true"
        return cls(use_chat_template=use, system_prompt=system_prompt)

    @property
    def answer_delimiter(self) -> str:
        """Text between the prompt and the answer."""
        return "" if self.use_chat_template else " "

    def render(self, tokenizer, question: str) -> str:
        if not self.use_chat_template:
            system = f"{self.system_prompt}\n\n" if self.system_prompt else ""
            return f"{system}Question: {question}\nAnswer:"
        messages = [{"role": "user", "content": question}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def render_few_shot(self, tokenizer, instruction: str, examples, question: str) -> str:
        """A prompt with an instruction and worked examples before the question: chat turns
        (instruction as the system message) or the same layout as plain text."""
        if not self.use_chat_template:
            shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in examples)
            return f"{instruction}\n\n{shots}Question: {question}\nAnswer:"
        messages = [{"role": "system", "content": instruction}]
        for user, assistant in examples:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        messages.append({"role": "user", "content": question})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def describe(self) -> dict:
        return {"chat_template": self.use_chat_template, "system_prompt": self.system_prompt,
                "answer_delimiter": self.answer_delimiter}
