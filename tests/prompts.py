"""Fixed prompt sets shared by the parity tests."""

LOGIT_PROMPTS = [
    "A list of colors: red, blue",
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "人工智能是",
    "I love pizza 🍕 because",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "The quick brown fox jumps over the lazy dog. " * 6,
    "import numpy as np\nx = np.",
    "Q: What is the boiling point of water?\nA:",
]

GREEDY_PROMPTS = [
    "A list of colors: red, blue",
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three laws of thermodynamics are",
    "My favourite recipe for pancakes:",
    "SELECT name, age FROM users WHERE",
    "Water is made of",
    "<|im_start|>user\nName three fruits.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "The history of the Roman Empire",
    "To be or not to be,",
    "In Python, a list comprehension",
    "The best way to learn a language is",
    "Photosynthesis is the process",
    "Dear hiring manager,",
    "1, 2, 3, 5, 8, 13,",
    "The weather today is",
    "How do airplanes fly?",
    "Here is a short story about a robot:",
]

# Different lengths, for batch-versus-alone checks.
BATCH_PROMPTS = [
    "Hi",
    "The capital of France is",
    "def add(a, b):\n    return",
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "1 2 3",
    "<|im_start|>user\nTell me a joke.<|im_end|>\n<|im_start|>assistant\n",
    "Colors of the rainbow: red, orange,",
    "The quick brown fox jumps over the lazy dog. " * 4,
]
