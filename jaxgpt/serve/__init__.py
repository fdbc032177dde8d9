"""Front ends: the OpenAI-compatible server and its page, the terminal chat, and the feedback store.

Imports: everything below it; never perf/.
"""
