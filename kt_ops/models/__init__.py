"""Model families and the surgery that puts kt experts into them."""
