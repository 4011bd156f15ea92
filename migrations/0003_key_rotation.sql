-- Key rotation: a key being replaced is 'retiring' (it still opens what it sealed, but running
-- ingesters move off it), then 'retired' once nothing references it, then optionally
-- 'destroyed' (wrapped bytes dropped).
ALTER TABLE vault_keys DROP CONSTRAINT vault_keys_state_check;
ALTER TABLE vault_keys ADD CONSTRAINT vault_keys_state_check
    CHECK (state IN ('active', 'retiring', 'retired', 'destroyed'));
