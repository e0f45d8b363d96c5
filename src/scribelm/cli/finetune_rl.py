"""placeholder"""

def register_rl(verbs, common, lora):
    pass
