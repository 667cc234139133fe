"""tcia-async: Task-Centric Instruction Augmentation against OpenAI-compatible APIs, rate-limit fast and resumable."""

__version__ = "0.1.0"
