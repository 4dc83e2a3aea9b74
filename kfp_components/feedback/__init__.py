"""AI feedback and teachers: one client for an LLM served behind an OpenAI-compatible API or loaded locally,
and the judges that score or compare a policy's responses with it (RLAIF)."""
